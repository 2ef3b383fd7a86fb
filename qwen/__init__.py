"""qwen: the Qwen (v1) models, tokenizer and chat utilities on current transformers.

Importing this package registers the classes with transformers' Auto* factories, so
`AutoConfig/AutoModelForCausalLM/AutoTokenizer.from_pretrained(original_qwen_dir)` work without
`trust_remote_code`.
"""

import os

import torch

# With DeepSpeed installed (fine-tuning), accelerate imports it on every save_pretrained, and
# without CUDA it prints "Setting accelerator to CPU" on stdout each time: say so up front.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from .configuration_qwen import QWenConfig  # noqa: E402
from .modeling_qwen import QWenCache, QWenLMHeadModel, QWenModel, QWenPreTrainedModel  # noqa: E402
from .qwen_generation_utils import (  # noqa: E402
    StopWordsLogitsProcessor,
    decode_tokens,
    get_stop_words_ids,
    make_context,
)
from .tokenization_qwen import QWenTokenizer  # noqa: E402

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
