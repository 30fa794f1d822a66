"""Static-shape causal export: fixed batch, one token per call, a fixed-size KV cache buffer.

NNAPI and CoreML compile a graph once for fixed shapes; a cache that grows by one column per
step defeats them. Here every input and output has a fixed shape:

- ``input_ids``, ``position_ids``: (batch, 1)
- ``attention_mask``: (batch, max_length), 1 for the buffer slots that hold real tokens
  (the runtime writes the current token's slot before the call)
- ``cache_position``: (1,), the buffer slot the new key/value goes to
- ``past_key_values.N.key/value`` -> ``present.N.key/value``: (batch, kv_heads, max_length, head_dim);
  ``present`` is ``past`` with the slot written (an elementwise select, which every provider
  has, instead of a scatter), so the runtime hands it back as the next ``past``.

The prompt goes through one token per call too: a second, prompt-sized graph would double
the file size on the phone for a faster first token only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgelm.export.causal import KVLayout, layer_windows, mask_argument, probe_layout, run_decoder
from edgelm.export.tracing import lean_shape_inference


def _slot_layer(keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor):
    from transformers.cache_utils import DynamicLayer

    class SlotLayer(DynamicLayer):
        """A cache layer whose ``update`` writes one slot of a fixed buffer instead of concatenating."""

        def update(self, key_states, value_states, cache_kwargs=None):
            self.keys = torch.where(slot, key_states, self.keys)
            self.values = torch.where(slot, value_states, self.values)
            return self.keys, self.values

    layer = SlotLayer()
    layer.keys, layer.values = keys, values
    return layer


def static_masks(attention_mask: torch.Tensor, cache_position: torch.Tensor, windows: list[int | None]):
    """(batch, 1, 1, max_length) additive masks per window: filled slots up to the current one, within the window."""
    length = attention_mask.shape[1]
    key_idx = torch.arange(length)
    allowed = (attention_mask[:, None, None, :] > 0) & (key_idx <= cache_position)[None, None, None, :]
    neg = torch.full((), torch.finfo(torch.float32).min)
    zero = torch.zeros(())
    out = {}
    for window in sorted(set(windows), key=lambda w: -1 if w is None else w):
        ok = allowed if window is None else allowed & (key_idx > cache_position - window)[None, None, None, :]
        out[window] = torch.where(ok, zero, neg)
    return out


class StaticCausalLMWrapper(nn.Module):
    def __init__(self, model: nn.Module, layout: KVLayout):
        super().__init__()
        self.model = model
        self.layout = layout
        self.windows = layer_windows(model.config)

    def forward(self, input_ids, attention_mask, position_ids, cache_position, *past):
        from transformers import DynamicCache

        length = attention_mask.shape[1]
        slot = (torch.arange(length) == cache_position)[None, None, :, None]
        cache = DynamicCache()
        cache.layers = [_slot_layer(past[2 * i], past[2 * i + 1], slot) for i in range(len(past) // 2)]
        mask_arg = mask_argument(self.model.config, static_masks(attention_mask, cache_position, self.windows))
        return run_decoder(self.model, input_ids, mask_arg, position_ids, cache, cache_position)


def export_static(model: nn.Module, onnx_path: Path, max_length: int, batch: int = 1,
                  opset: int = 17) -> tuple[KVLayout, list[str], list[str]]:
    layout = probe_layout(model)
    wrapper = StaticCausalLMWrapper(model, layout).eval()
    inputs = ["input_ids", "attention_mask", "position_ids", "cache_position", *layout.input_names()]
    outputs = ["logits", "last_hidden_state", *layout.output_names()]
    dummy = (
        torch.zeros((batch, 1), dtype=torch.long),
        torch.ones((batch, max_length), dtype=torch.long),
        torch.zeros((batch, 1), dtype=torch.long),
        torch.zeros((1,), dtype=torch.long),
        *[torch.zeros(batch, layout.num_kv_heads, max_length, layout.head_dim) for _ in range(2 * layout.num_layers)],
    )
    with torch.no_grad(), lean_shape_inference():
        torch.onnx.export(wrapper, dummy, str(onnx_path), input_names=inputs, output_names=outputs,
                          opset_version=opset, do_constant_folding=True, dynamo=False)
    return layout, inputs, outputs


def static_reference(model: Any, tokenizer: Any, max_length: int) -> dict[str, Any]:
    """PyTorch's last-position logits for a prompt and 3 greedy tokens (computed before the export, so the model
    can be freed before onnxruntime loads the graph)."""
    import numpy as np

    ids = list(tokenizer("The capital of France is", add_special_tokens=True)["input_ids"])[: max_length - 4]
    n_prompt = len(ids)
    logits = []
    for slot in range(n_prompt - 1, n_prompt + 3):
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([ids[: slot + 1]])).logits[0, -1].numpy().copy()
        logits.append(ref)
        if slot + 1 >= len(ids):
            ids.append(int(np.argmax(ref)))
    return {"ids": ids, "prompt": n_prompt, "logits": logits}


def check_static(onnx_path: Path, reference: dict[str, Any], layout: KVLayout, max_length: int,
                 atol: float) -> dict[str, Any]:
    """Feed the reference tokens one per call; every step's logits from the prompt's end on must match PyTorch's."""
    import numpy as np
    import onnxruntime as ort

    from edgelm.runtime.errors import ExportError

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ids, n_prompt = reference["ids"], reference["prompt"]
    names = layout.input_names()
    past = {n: np.zeros((1, layout.num_kv_heads, max_length, layout.head_dim), np.float32) for n in names}
    mask = np.zeros((1, max_length), np.int64)
    worst = 0.0
    for slot in range(n_prompt + 3):
        mask[0, slot] = 1
        feeds = {"input_ids": np.array([[ids[slot]]], np.int64), "attention_mask": mask,
                 "position_ids": np.array([[slot]], np.int64), "cache_position": np.array([slot], np.int64), **past}
        outs = sess.run(None, feeds)
        past = {n: outs[2 + i] for i, n in enumerate(names)}
        if slot >= n_prompt - 1:
            ref = reference["logits"][slot - (n_prompt - 1)]
            worst = max(worst, float(np.abs(outs[0][0, -1] - ref).max()))
    if not worst <= atol:
        raise ExportError(f"static-shape export does not match PyTorch: logits differ by {worst:.2e} (limit {atol})")
    return {"max_abs_diff_logits": worst, "logits_atol": atol, "steps": n_prompt + 3, "mode": "static, one token per call"}
