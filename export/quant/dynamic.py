"""Scheme ``int8-dynamic``: onnxruntime's dynamic quantization (MatMulInteger), for runtimes without MatMulNBits.

Weights and activations are int8 per tensor, activations quantized at run time. It loses far
more than weight-only ``int8`` (a perplexity ratio of ~2 on SmolLM2 against ~1.001), but it
runs on ONNX Runtime Mobile builds that lack the contrib operators MatMulNBits and
GatherBlockQuantized, e.g. the React Native package's 1.24 (see android_demo/README.md).
The embedding table and LM head stay float32 (dynamic quantization rewrites MatMul only).
"""

from __future__ import annotations

from pathlib import Path

import onnx

name = "int8-dynamic"


def quantize_file(src: Path, out: Path) -> dict[str, object]:
    """Write the quantized graph of ``src`` to ``out`` (external data beside it)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # DefaultTensorType: shape inference cannot type the outputs of contrib operators
    # (GroupQueryAttention, SkipSimplifiedLayerNormalization); they are all float32 here.
    # Per tensor: onnxruntime 1.32's per-channel MatMul quantization (with onnx 1.23.2) wrote a SmolLM2 graph
    # whose perplexity ratio measured 134,780 (an earlier install: 1.79); per tensor measured 2.02 on the same
    # float graph. The export's quality line is what catches a quantizer regression like this one.
    quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                     per_channel=False, use_external_data_format=True,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return {"method": "onnxruntime quantize_dynamic, MatMul weights, QInt8 per tensor (MatMulInteger)"}
