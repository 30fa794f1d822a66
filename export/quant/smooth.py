"""Activation outliers moved into the weights before quantizing (SmoothQuant, Xiao et al., 2022).

Why: MatMulNBits at ``accuracy_level`` 4 quantizes each row of its input to int8 per block of the
weights' block size, on the block's largest value. A few channels of a Llama layer's normalized
input are tens of times larger than the rest, so the other channels of their block keep a handful
of int8 levels. Measured on SmolLM2's `int8` export (AVX2 host, onnxruntime 1.32): the same 8-bit
weights computed in float32 (``accuracy_level`` 0) give a mean KL divergence from the float32 graph
of 0.0005 per token; with int8 activations, 0.0056. The activations, not the weights, were the loss.

How: dividing channel ``j`` of an activation by ``s_j`` and multiplying row ``j`` of every weight
matrix that reads it by ``s_j`` leaves the float product unchanged. Where the activation is an
RMSNorm's output the division folds into the norm's gain, so the graph gains no operator and the
float32 export is untouched (the quantized copy is what changes). ``s_j = max|x_j|^alpha /
max|w_j|^(1 - alpha)`` over the calibration tokens and the weights' rows, scaled to a geometric mean
of 1: the larger alpha, the more of the activations' spread goes to the weights (1: all of it).

Where: the outputs of ``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` (the
Llama family's RMSNorm as edgelm exports it) that feed only weight MatMuls (q/k/v, gate/up) and are
not graph outputs (the final norm is ``last_hidden_state``, so the LM head's input stays as it is),
with an initializer for a gain (one that other norms read too, equal gains deduplicated, is copied
first). Other architectures' LayerNorms are left alone.

The calibration activations the scheme keeps are divided by ``s`` too, so GPTQ's statistics
describe the inputs the smoothed weights will meet.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from edgelm.export import onnx_files

NORMS = {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2}
"""RMSNorm operators -> the input index of their gain."""


def scales(x: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """Per-channel ``s`` (K,) for activations ``x`` (tokens, K) read by ``weights`` [(K, N), ...]."""
    amax = np.abs(x).max(axis=0).astype(np.float64)
    wmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0).astype(np.float64)
    live = (amax > 0) & (wmax > 0)
    s = np.ones_like(amax)
    s[live] = amax[live] ** alpha / wmax[live] ** (1.0 - alpha)
    s[live] /= np.exp(np.mean(np.log(s[live])))
    return s


def smooth(model: onnx.ModelProto, activations: dict[str, np.ndarray], alpha: float,
           log: Callable[[str], None] = print) -> int:
    """Rescale, in place, every RMSNorm output that qualifies (module docstring) and the weights reading it;
    ``activations`` (weight name -> its calibration inputs) is updated to match. Returns how many were rescaled.

    Weights that read the same activation keep sharing one array (GPTQ factors each array once). ``alpha`` 0 or
    less turns it off."""
    if alpha <= 0 or not activations:
        return 0
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}

    def weights_reading(name: str) -> list[str] | None:
        readers = users.get(name, [])
        if name in outputs or not readers:
            return None
        found = []
        for node in readers:
            if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or node.input[0] != name \
                    or node.input[1] not in inits or len(users[node.input[1]]) != 1 \
                    or len(inits[node.input[1]].dims) != 2 or node.input[1] not in activations:
                return None
            found.append(node.input[1])
        return found

    done = 0
    for node in graph.node:
        index = NORMS.get(node.op_type)
        if index is None or node.domain not in ("", "ai.onnx", "com.microsoft") or len(node.input) <= index:
            continue
        gain = node.input[index]
        names = weights_reading(node.output[0])
        if not names or gain not in inits:
            continue
        ws = [np.asarray(onnx_files.array(inits[n]), np.float32) for n in names]
        g = np.asarray(onnx_files.array(inits[gain]), np.float32)
        x = activations[names[0]]
        if g.shape != (x.shape[1],) or any(w.shape[0] != x.shape[1] for w in ws):
            continue
        s = scales(x, ws, alpha)
        if len(users[gain]) > 1:  # a gain other norms read too (equal gains deduplicated): this norm gets its own
            users[gain].remove(node)
            gain = f"{gain}_smoothed_{done}"
            node.input[index] = gain
            inits[gain] = graph.initializer.add()
            inits[gain].name = gain
            users[gain] = [node]
        _replace(inits[gain], g / s)
        for name, w in zip(names, ws):
            _replace(inits[name], w * s[:, None])
        smoothed = (x / s).astype(np.float32)
        for name in names:
            activations[name] = smoothed
        done += 1
    log(f"      smoothed {done} normalized activations into their weights (SmoothQuant, alpha {alpha})")
    return done


def _replace(tensor: onnx.TensorProto, values: np.ndarray) -> None:
    """The initializer's values, now held in memory (``onnx_files.save`` streams it like any other)."""
    tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(values, np.float32), tensor.name))
