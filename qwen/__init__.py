"""qwen: the Qwen (v1) models, tokenizer and chat utilities on current transformers.

Importing this package registers the classes with transformers' Auto* factories, so
`AutoConfig/AutoModelForCausalLM/AutoTokenizer.from_pretrained(original_qwen_dir)` work without
`trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .configuration_qwen import QWenConfig
from .modeling_qwen import QWenCache, QWenLMHeadModel, QWenModel, QWenPreTrainedModel
from .qwen_generation_utils import (
    StopWordsLogitsProcessor,
    decode_tokens,
    get_stop_words_ids,
    make_context,
)
from .tokenization_qwen import QWenTokenizer

__version__ = "0.1.0"

AutoConfig.register("qwen", QWenConfig, exist_ok=True)
AutoModel.register(QWenConfig, QWenModel, exist_ok=True)
AutoModelForCausalLM.register(QWenConfig, QWenLMHeadModel, exist_ok=True)
AutoTokenizer.register(QWenConfig, slow_tokenizer_class=QWenTokenizer, exist_ok=True)

__all__ = [
    "QWenCache",
    "QWenConfig",
    "QWenLMHeadModel",
    "QWenModel",
    "QWenPreTrainedModel",
    "QWenTokenizer",
    "StopWordsLogitsProcessor",
    "decode_tokens",
    "get_stop_words_ids",
    "make_context",
]
