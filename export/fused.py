"""Fused attention for the Llama family: onnxruntime's GroupQueryAttention with its own rotary.

A traced Llama layer is ~40 small ONNX nodes of attention (rotate-half slices, concats, the
KV repeat, two batched MatMuls, softmax); onnxruntime-genai's builder emits one fused operator
instead, which matters most once weights are quantized and the step is no longer bound by
reading them. Here the attention modules are swapped, during tracing only, for a
``torch.autograd.Function`` whose forward is transformers' own computation (so the trace and
PyTorch agree by construction) and whose ONNX symbolic is one node per layer:

- q, k and v come from one MatMul over the concatenated weights (one kernel, quantized as one)
  and go into ``GroupQueryAttention`` packed, with ``do_rotary=1``: no Split and no separate
  ``RotaryEmbedding`` nodes (three fewer per layer; ~6% of a quantized SmolLM2 decode step).
- ``GroupQueryAttention(qkv, past, seqlens_k = total - 1, total, cos, sin, attention_bias)`` with
  our additive mask as the bias (padding, causality, sliding window), so the KV cache keeps
  optimum's layout: ``present = concat(past, new)`` with ``num_key_value_heads`` heads.

Rotary positions are cache slots (the kernel's own: ``seqlens_k + 1 - new + i``), not the graph's
``position_ids``. For an unpadded row the two are the same numbers. For a left-padded row every
token sits ``pad`` slots later than its position, and rotary attention depends only on the
distance between a query and a key, which is the same in slots, so the scores are the same up to
float rounding (the export's padded-batch validation and the fused-vs-plain tests check it). The
kernel cannot be given per-row positions in a first prompt (it reads one offset for the whole
batch then), so slots are the only numbering that stays consistent from the prompt to the
decode steps. ``position_ids`` stays a graph input, for optimum's I/O contract.

onnxruntime's CPU kernel needs a head size that is a multiple of 16 and, with a past, one row
when more than one token comes in; the runtime splits such chunks into single tokens.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

FUSABLE = ("llama", "mistral", "qwen2")
STATIC_ROPE = (None, "default", "linear", "llama3")


def fusable(model: nn.Module) -> str | None:
    """None when the model's attention can be fused, else why not (the export then keeps plain ops)."""
    config = model.config
    if config.model_type not in FUSABLE:
        return f"{config.model_type} attention is exported as plain ONNX ops (fusion covers {', '.join(FUSABLE)})"
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim % 16:
        return f"head size {head_dim} is not a multiple of 16, which onnxruntime's GroupQueryAttention needs"
    rope = getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type")) if rope else None
    if kind not in STATIC_ROPE:
        return f"rope scaling {kind!r} depends on the sequence length; exported as plain ops"
    return None


def will_fuse(model: nn.Module, fuse: bool) -> bool:
    """Whether an export asked to ``fuse`` really fuses this model's attention: the one rule the tracer and the
    validation plan (GroupQueryAttention takes multi-token chunks one row at a time) both follow."""
    return bool(fuse) and fusable(model) is None


def rotary_tables(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for every position, (max_positions, head_dim / 2), computed as transformers computes them."""
    rotary = model.base_model.rotary_emb if hasattr(model.base_model, "rotary_emb") else model.model.rotary_emb
    positions = torch.arange(model.config.max_position_embeddings, dtype=torch.float32)
    freqs = torch.outer(positions, rotary.inv_freq.float())
    scale = float(getattr(rotary, "attention_scaling", 1.0))
    return (freqs.cos() * scale).contiguous(), (freqs.sin() * scale).contiguous()


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, module, qkv, past_k, past_v, bias, seqlens_k, total, cos_table, sin_table, cos, sin):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

        q, k, v = qkv.split(_sizes(module), dim=-1)
        batch, seq, _ = q.shape
        d = module.head_dim
        qh = q.view(batch, seq, -1, d).transpose(1, 2)
        kh = k.view(batch, seq, -1, d).transpose(1, 2)
        vh = v.view(batch, seq, -1, d).transpose(1, 2)
        qh, kh = apply_rotary_pos_emb(qh, kh, cos, sin)
        keys = torch.cat([past_k, kh], dim=2)
        values = torch.cat([past_v, vh], dim=2)
        out, _ = eager_attention_forward(module, qh, keys, values, bias, dropout=0.0, scaling=module.scaling)
        return out.reshape(batch, seq, -1), keys, values

    @staticmethod
    def symbolic(g, module, qkv, past_k, past_v, bias, seqlens_k, total, cos_table, sin_table, cos, sin):
        from torch.onnx import symbolic_helper

        config = module.config
        none = symbolic_helper._optional_input_placeholder_tensor(g)
        out, keys, values = g.op(
            "com.microsoft::GroupQueryAttention", qkv, none, none, past_k, past_v, seqlens_k, total, cos_table,
            sin_table, none, bias, num_heads_i=config.num_attention_heads, kv_num_heads_i=config.num_key_value_heads,
            scale_f=float(module.scaling), local_window_size_i=-1, do_rotary_i=1, rotary_interleaved_i=0, outputs=3)
        # shapes are dynamic: declare the types so the exporter need not infer them
        out.setType(qkv.type().with_sizes([None] * 3))
        keys.setType(past_k.type().with_sizes([None] * 4))
        values.setType(past_v.type().with_sizes([None] * 4))
        return out, keys, values


def _sizes(module: nn.Module) -> list[int]:
    return [module.q_proj.out_features, module.k_proj.out_features, module.v_proj.out_features]


@contextlib.contextmanager
def fused_attention(model: nn.Module, call: dict[str, torch.Tensor]) -> Iterator[None]:
    """Swap every attention module's forward for the fused one while the block runs.

    ``call`` must hold the graph's 2D ``attention_mask`` when the model runs (the attention
    modules only receive cos/sin and the 4D mask, and GroupQueryAttention's lengths come from the
    mask's width); the wrapper refills it per call.
    """
    cos_table, sin_table = rotary_tables(model)
    originals: list[tuple[nn.Module, Any]] = []

    def lengths() -> tuple[torch.Tensor, torch.Tensor]:
        """GroupQueryAttention's seqlens_k (batch,) = total - 1 and total (scalar), int32, once per graph:
        every slot of the cache counts (padding is in the bias), so they follow the mask's width."""
        if "seqlens_k" not in call:
            width = torch.ones_like(call["attention_mask"], dtype=torch.int32).sum(dim=1, dtype=torch.int32)
            call["seqlens_k"] = width - 1
            call["total"] = width[0]
        return call["seqlens_k"], call["total"]

    def make_forward(module: nn.Module):
        # One MatMul for q, k and v (one quantized kernel instead of three), split after. The fused
        # weight is a parameter of the module, for the time of the export, so that the exporter writes
        # it as an initializer (which the quantizers rewrite), not as a Constant node (which they skip).
        def param(tensors: list[torch.Tensor]) -> nn.Parameter:
            return nn.Parameter(torch.cat(tensors).detach(), requires_grad=False)

        module.register_parameter("edgelm_qkv_weight", param([module.q_proj.weight, module.k_proj.weight,
                                                              module.v_proj.weight]))
        biases = [p.bias for p in (module.q_proj, module.k_proj, module.v_proj)]
        if all(b is not None for b in biases):
            module.register_parameter("edgelm_qkv_bias", param(biases))

        def forward(hidden_states, position_embeddings, attention_mask, past_key_value=None, cache_position=None,
                    **kwargs):
            layer = past_key_value.layers[module.layer_idx]
            cos, sin = position_embeddings
            qkv = nn.functional.linear(hidden_states, module.edgelm_qkv_weight, getattr(module, "edgelm_qkv_bias", None))
            seqlens_k, total = lengths()
            out, keys, values = _FusedAttention.apply(
                module, qkv, layer.keys, layer.values, attention_mask, seqlens_k, total, cos_table, sin_table, cos, sin)
            layer.keys, layer.values = keys, values
            return module.o_proj(out), None

        return forward

    for module in model.modules():
        if hasattr(module, "q_proj") and hasattr(module, "o_proj") and hasattr(module, "layer_idx"):
            originals.append((module, module.forward))
            module.forward = make_forward(module)
    try:
        yield
    finally:
        for module, forward in originals:
            module.forward = forward
            for name in ("edgelm_qkv_weight", "edgelm_qkv_bias"):
                module._parameters.pop(name, None)
