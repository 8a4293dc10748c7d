"""Model families behind one small interface (model_zoo.family.Family)."""

import ml_collections

from model_zoo import transformer  # noqa: F401  (registers 'transformer')
from model_zoo import mamba  # noqa: F401  (registers 'mamba')
from model_zoo import var  # noqa: F401  (registers 'var')
from model_zoo import var_tokenizer  # noqa: F401  (registers 'var_tokenizer')
from model_zoo.family import FAMILIES, Family
from pretrain.config import core_config
from pretrain.registry import Registry

__all__ = ['FAMILIES', 'Family', 'base_config']


def base_config(families: Registry[Family] = FAMILIES) -> ml_collections.ConfigDict:
    """Every key a run can set: the trainer's core keys plus each family's own model section.

    Families that share a section (both VAR stages own model.var) must give it the same
    defaults; the result is locked, so a typo in a config file is an error.
    """
    config = core_config()
    sections: dict[str, tuple[str, dict]] = {}
    for name in families.names():
        family = families.get(name)
        for section, defaults in (family.default_config() if family.default_config else {}).items():
            if section in sections and sections[section][1] != defaults:
                raise ValueError(f'model.{section} is given different defaults by families '
                                 f'{sections[section][0]!r} and {name!r}')
            sections[section] = (name, defaults)
    with config.unlocked():
        for section, (_, defaults) in sorted(sections.items()):
            config.model[section] = defaults
    return config
