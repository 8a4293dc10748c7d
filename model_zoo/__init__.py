"""Model families behind one small interface (model_zoo.family.Family)."""

from model_zoo import transformer  # noqa: F401  (registers 'transformer')
from model_zoo.family import FAMILIES, Family

__all__ = ['FAMILIES', 'Family']
