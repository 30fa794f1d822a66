"""edgelm's runtime: numpy + onnxruntime + tokenizers, nothing heavier.

It must never import torch, transformers or optimum (a test runs it where importing them
fails), so that the same code runs on a phone-class device.
"""

from edgelm.runtime.causal_lm import CausalLM
from edgelm.runtime.config import GenerationConfig
from edgelm.runtime.conversation import Conversation
from edgelm.runtime.errors import (EdgeLMError, GenerationConfigError, InputError, ModelLoadError, ProviderError,
                                   UnsupportedError)
from edgelm.runtime.generate import GenerateOutput
from edgelm.runtime.masked import MaskedLM
from edgelm.runtime.streamer import TextIteratorStreamer, TextStreamer
from edgelm.runtime.tokenizer import Tokenizer

__all__ = [
    "CausalLM", "Conversation", "MaskedLM", "GenerationConfig", "GenerateOutput", "Tokenizer", "TextStreamer", "TextIteratorStreamer",
    "EdgeLMError", "GenerationConfigError", "InputError", "ModelLoadError", "ProviderError", "UnsupportedError",
]
