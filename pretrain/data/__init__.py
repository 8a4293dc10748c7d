"""Text data: tokenizers, document sources and the packed, shuffled batch pipeline."""

from pretrain.data.sources import check_data_config
from pretrain.data.text import TextPipeline, make_text_pipeline
from pretrain.data.tokenizers import TOKENIZERS, make_tokenizer

__all__ = ['TOKENIZERS', 'TextPipeline', 'check_data_config', 'make_text_pipeline',
           'make_tokenizer']
