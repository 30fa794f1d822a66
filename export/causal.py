"""Causal LM export: a traced graph with the KV cache in and out, plus the final hidden state.

The wrapper builds its own 4D additive attention mask instead of letting transformers
build it: the legacy TorchScript exporter cannot trace transformers' vmap-based mask
(``unordered_map::at``), and the mask must be a function of the graph's inputs anyway
(padding from ``attention_mask``, causality from the past length, and a sliding window
for the layers that have one).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgelm.export.tracing import lean_shape_inference


@dataclass
class KVLayout:
    """Shape facts of the cache, read off a real forward pass rather than guessed from configs."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    def input_names(self) -> list[str]:
        names = []
        for i in range(self.num_layers):
            names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        return names

    def output_names(self) -> list[str]:
        names = []
        for i in range(self.num_layers):
            names += [f"present.{i}.key", f"present.{i}.value"]
        return names


def layer_windows(config: Any) -> list[int | None]:
    """Per layer, the sliding window size or None (full attention), as transformers applies it."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return [window if t == "sliding_attention" else None for t in layer_types]
    if window is not None and config.model_type in ("mistral", "phi3"):
        return [window] * n
    return [None] * n


def attention_masks(attention_mask: torch.Tensor, query_len: int, windows: list[int | None], dtype: torch.dtype):
    """4D additive masks (batch, 1, query, key), one per distinct window size."""
    total = attention_mask.shape[1]
    key_idx = torch.arange(total, device=attention_mask.device)
    query_pos = torch.arange(query_len, device=attention_mask.device) + (total - query_len)
    causal = key_idx[None, :] <= query_pos[:, None]
    padding = attention_mask[:, None, None, :].to(torch.bool)
    out = {}
    for window in sorted(set(windows), key=lambda w: -1 if w is None else w):
        allowed = causal if window is None else causal & (key_idx[None, :] > query_pos[:, None] - window)
        allowed = allowed[None, None, :, :] & padding
        zero = torch.zeros((), dtype=dtype)
        out[window] = torch.where(allowed, zero, torch.full((), torch.finfo(dtype).min, dtype=dtype))
    return out


def mask_argument(config: Any, masks: dict) -> Any:
    """What transformers' decoder takes as ``attention_mask``: one 4D mask, or one per layer type."""
    if not getattr(config, "layer_types", None):
        return next(iter(masks.values()))
    arg = {"full_attention": masks.get(None, next(iter(masks.values())))}
    windowed = [w for w in masks if w is not None]
    if windowed:
        arg["sliding_attention"] = masks[windowed[0]]
    return arg


def lm_head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from the final hidden state, with the final soft-capping of the models that have one (Gemma)."""
    logits = model.get_output_embeddings()(hidden)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def run_decoder(model: nn.Module, input_ids, mask_arg, position_ids, cache, cache_position) -> tuple:
    """One traced forward: (logits, last_hidden_state, present.0.key, present.0.value, ...)."""
    out = decoder_of(model)(
        input_ids=input_ids, attention_mask=mask_arg, position_ids=position_ids,
        past_key_values=cache, use_cache=True, cache_position=cache_position,
    )
    presents = []
    for layer in cache.layers:
        presents += [layer.keys, layer.values]
    return (lm_head(model, out.last_hidden_state), out.last_hidden_state, *presents)


class CausalLMWrapper(nn.Module):
    """Flat tensors in and out, in optimum's names, around a transformers causal LM."""

    def __init__(self, model: nn.Module, layout: KVLayout):
        super().__init__()
        self.model = model
        self.layout = layout
        self.windows = layer_windows(model.config)
        self.call: dict[str, torch.Tensor] = {}
        """The current call's 2D attention_mask, for fused attention, which needs its width and cannot get it
        from transformers."""

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        self.call.clear()
        self.call["attention_mask"] = attention_mask
        cache = DynamicCache.from_legacy_cache(tuple((past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)))
        query_len = input_ids.shape[1]
        mask_arg = mask_argument(self.model.config,
                                 attention_masks(attention_mask, query_len, self.windows, torch.float32))
        total = attention_mask.shape[1]
        cache_position = torch.arange(total - query_len, total, device=input_ids.device)
        return run_decoder(self.model, input_ids, mask_arg, position_ids, cache, cache_position)


def decoder_of(model: nn.Module) -> nn.Module:
    """The model without its LM head (its output is the final-norm hidden state)."""
    base = model.base_model
    if base is model:  # e.g. Gemma3ForCausalLM names its decoder differently from its prefix
        base = model.get_decoder()
    return base


def probe_layout(model: nn.Module) -> KVLayout:
    """Run one token through the model and read the cache shapes it produces."""
    from transformers import DynamicCache

    with torch.no_grad():
        out = model(input_ids=torch.zeros((1, 1), dtype=torch.long), past_key_values=DynamicCache(), use_cache=True)
    layers = out.past_key_values.layers
    _, heads, _, head_dim = layers[0].keys.shape
    return KVLayout(num_layers=len(layers), num_kv_heads=int(heads), head_dim=int(head_dim))


def dummy_inputs(layout: KVLayout, batch: int = 2, seq: int = 3, past: int = 4) -> tuple[torch.Tensor, ...]:
    total = past + seq
    ids = torch.randint(0, 8, (batch, seq), dtype=torch.long)
    mask = torch.ones((batch, total), dtype=torch.long)
    pos = torch.arange(past, total, dtype=torch.long)[None].expand(batch, -1).contiguous()
    kv = [torch.randn(batch, layout.num_kv_heads, past, layout.head_dim) for _ in range(2 * layout.num_layers)]
    return (ids, mask, pos, *kv)


def export_causal(model: nn.Module, onnx_path: Path, opset: int = 17,
                  fuse: bool = True) -> tuple[KVLayout, list[str], list[str], str | None]:
    """Trace ``model`` to ``onnx_path``; return the cache layout, the graph's I/O names and the fused op (or None).

    With ``fuse``, Llama-family attention becomes onnxruntime's GroupQueryAttention with its own rotary
    (see ``fused``); other models, or ``fuse=False``, keep plain ONNX ops.
    """
    from edgelm.export.fused import fused_attention, will_fuse

    layout = probe_layout(model)
    wrapper = CausalLMWrapper(model, layout).eval()
    fused = will_fuse(model, fuse)
    context = fused_attention(model, wrapper.call) if fused else contextlib.nullcontext()
    inputs = ["input_ids", "attention_mask", "position_ids", *layout.input_names()]
    outputs = ["logits", "last_hidden_state", *layout.output_names()]
    axes = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
        "last_hidden_state": {0: "batch_size", 1: "sequence_length"},
    }
    for name in layout.input_names():
        axes[name] = {0: "batch_size", 2: "past_sequence_length"}
    for name in layout.output_names():
        axes[name] = {0: "batch_size", 2: "total_sequence_length"}
    with torch.no_grad(), context, lean_shape_inference():
        torch.onnx.export(
            wrapper, dummy_inputs(layout), str(onnx_path), input_names=inputs,
            output_names=outputs, dynamic_axes=axes, opset_version=opset, do_constant_folding=True, dynamo=False,
            custom_opsets={"com.microsoft": 1} if fused else None,
        )
    return layout, inputs, outputs, ("GroupQueryAttention" if fused else None)
