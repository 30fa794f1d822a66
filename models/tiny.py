"""Tiny random models, one per supported architecture, for fast tests.

Each is seeded and built from a config, so every machine builds the same weights.
The initializer range is larger than the libraries' default: with the default, a random
model's logits are nearly flat and float32 rounding could flip the argmax between
PyTorch and ONNX Runtime, which would make token-exact parity tests flaky for no reason
that says anything about the exporter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from edgelm.models.tiny_tokenizers import CHATML_TEMPLATE, byte_level_bpe, roberta_bpe, wordpiece

CAUSAL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
INIT_RANGE = 0.25


def _causal_tokenizer() -> Any:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=byte_level_bpe(400, CAUSAL_SPECIALS),
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_input_names=["input_ids", "attention_mask"],
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def _bert_tokenizer(with_token_types: bool) -> Any:
    from transformers import PreTrainedTokenizerFast

    names = ["input_ids", "token_type_ids", "attention_mask"] if with_token_types else ["input_ids", "attention_mask"]
    return PreTrainedTokenizerFast(
        tokenizer_object=wordpiece(300),
        unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
        model_input_names=names,
    )


def _roberta_tokenizer() -> Any:
    from transformers import AddedToken, PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=roberta_bpe(400),
        bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>", unk_token="<unk>", pad_token="<pad>",
        mask_token=AddedToken("<mask>", lstrip=True, rstrip=False),
        model_input_names=["input_ids", "attention_mask"],
    )


_CAUSAL_COMMON = dict(vocab_size=400, bos_token_id=0, eos_token_id=2, pad_token_id=0, initializer_range=INIT_RANGE)
_DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, **_CAUSAL_COMMON)


def _configs() -> dict[str, tuple[str, Callable[[], Any], Callable[[], Any]]]:
    """name -> (task, config factory, tokenizer factory)."""
    import transformers as tf

    return {
        "gpt2": ("causal", lambda: tf.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=256, **_CAUSAL_COMMON),
                 _causal_tokenizer),
        "llama": ("causal", lambda: tf.LlamaConfig(**_DECODER, tie_word_embeddings=True), _causal_tokenizer),
        "qwen2": ("causal", lambda: tf.Qwen2Config(**_DECODER), _causal_tokenizer),
        "mistral": ("causal", lambda: tf.MistralConfig(**_DECODER, sliding_window=6, head_dim=16), _causal_tokenizer),
        "phi3": ("causal", lambda: tf.Phi3Config(**{**_DECODER, "pad_token_id": 0}), _causal_tokenizer),
        "gemma3": ("causal", lambda: tf.Gemma3TextConfig(
            **{**_DECODER, "num_hidden_layers": 4}, head_dim=16, sliding_window=5, query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"]),
            _causal_tokenizer),
        "bert": ("masked", lambda: tf.BertConfig(
            vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=128, initializer_range=INIT_RANGE, pad_token_id=0),
            lambda: _bert_tokenizer(True)),
        "distilbert": ("masked", lambda: tf.DistilBertConfig(
            vocab_size=300, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=128,
            initializer_range=INIT_RANGE, pad_token_id=0),
            lambda: _bert_tokenizer(False)),
        "roberta": ("masked", lambda: tf.RobertaConfig(
            vocab_size=400, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=130, type_vocab_size=1, initializer_range=INIT_RANGE,
            pad_token_id=1, bos_token_id=0, eos_token_id=2),
            _roberta_tokenizer),
    }


TINY_ARCHS: tuple[str, ...] = ("gpt2", "llama", "qwen2", "mistral", "phi3", "gemma3", "bert", "distilbert", "roberta")
CAUSAL_ARCHS: tuple[str, ...] = ("gpt2", "llama", "qwen2", "mistral", "phi3", "gemma3")
MASKED_ARCHS: tuple[str, ...] = ("bert", "distilbert", "roberta")


def build_tiny(arch: str, out_dir: Path, seed: int = 0) -> None:
    """Write a seeded random checkpoint of ``arch`` (weights, config, tokenizer) to ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, GenerationConfig

    task, make_config, make_tokenizer = _configs()[arch]
    torch.manual_seed(seed)
    config = make_config()
    auto = AutoModelForCausalLM if task == "causal" else AutoModelForMaskedLM
    model = auto.from_config(config, attn_implementation="eager").eval()
    model.save_pretrained(out_dir)
    make_tokenizer().save_pretrained(out_dir)
    if task == "causal":
        GenerationConfig(bos_token_id=0, eos_token_id=2, pad_token_id=0).save_pretrained(out_dir)
