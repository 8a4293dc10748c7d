"""Named registries for pluggable pieces (model families, schedules, tokenizers, ...)."""

from collections.abc import Callable
from typing import Generic, TypeVar

from pretrain.errors import check_choice

T = TypeVar('T')


class Registry(Generic[T]):
    """A name -> object table whose lookups fail with the allowed names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f'{self.kind} {name!r} is registered twice')
            self._items[name] = item
            return item
        return add

    def get(self, name: str, key: str | None = None) -> T:
        check_choice(key or self.kind, name, self.names())
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)
