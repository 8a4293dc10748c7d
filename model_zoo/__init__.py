"""Model families behind one small interface (model_zoo.family.Family)."""

from model_zoo import transformer  # noqa: F401  (registers 'transformer')
from model_zoo import mamba  # noqa: F401  (registers 'mamba')
from model_zoo import var  # noqa: F401  (registers 'var')
from model_zoo import var_tokenizer  # noqa: F401  (registers 'var_tokenizer')
from model_zoo.family import FAMILIES, Family

__all__ = ['FAMILIES', 'Family']
