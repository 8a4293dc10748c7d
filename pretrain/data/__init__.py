"""Data pipelines: text (tokenizers, sources, packed windows) and images; `make_pipeline` picks one."""

from typing import Any

from pretrain.data.images import ImagePipeline, check_image_config, make_image_pipeline
from pretrain.data.sources import check_data_config
from pretrain.data.text import TextPipeline, make_text_pipeline
from pretrain.data.tokenizers import TOKENIZERS, make_tokenizer

__all__ = ['TOKENIZERS', 'ImagePipeline', 'TextPipeline', 'check_data_config',
           'check_image_config', 'make_image_pipeline', 'make_pipeline', 'make_text_pipeline',
           'make_tokenizer']


def make_pipeline(cfg: Any, family: Any, **kwargs) -> TextPipeline | ImagePipeline:
    """The pipeline `family.data` names, for the full config; kwargs as make_text_pipeline's.

    A family may add pipeline arguments of its own (`family.pipeline_options(cfg)`), e.g. an
    image family's class count and frozen batch transform.
    """
    options = family.pipeline_options(cfg) if family.pipeline_options else {}
    if family.data == 'text':
        return make_text_pipeline(cfg.data, **options, **kwargs)
    if family.data == 'image':
        return make_image_pipeline(cfg.data.image, **options, **kwargs)
    raise ValueError(f'unknown data kind {family.data!r} of model.family={cfg.model.family!r}')
