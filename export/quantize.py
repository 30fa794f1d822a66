"""Weight quantization of an exported graph with onnxruntime's own quantizers (no hand-written kernels).

int8: dynamic quantization of the MatMul weights (activations are quantized on the fly), which
onnxruntime runs with MatMulInteger on every CPU and on mobile builds.
int4: weight-only block quantization to MatMulNBits (onnxruntime's contrib operator, the one
onnxruntime-genai uses), blocks of 32 along the input dimension, symmetric, with
``accuracy_level`` 4 so the CPU kernel computes in int8 (the fast path on x86 and ARM).
Either way the KV cache and the graph's inputs and outputs stay float32, so the runtime drives
a quantized model unchanged.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from edgelm.runtime.errors import ExportError

SCHEMES = ("int8", "int4")
INT4_BLOCK = 32


def _int4(src: Path, out: Path) -> str:
    try:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    except ImportError as exc:  # onnxruntime's int4 quantizer needs onnx-ir
        raise ExportError(f"int4 quantization needs onnx-ir ({exc}); pip install 'edgelm[export]'") from exc
    config = DefaultWeightOnlyQuantConfig(block_size=INT4_BLOCK, is_symmetric=True, accuracy_level=4)
    quant = MatMulNBitsQuantizer(onnx.load(str(src)), algo_config=config)
    quant.process()
    quant.model.save_model_to_file(str(out), use_external_data_format=True)
    return f"onnxruntime MatMulNBitsQuantizer, MatMul weights, 4 bits, block {INT4_BLOCK}, symmetric, accuracy_level 4"


def quantize_model(src: Path, scheme: str) -> tuple["onnx.ModelProto", dict[str, object]]:
    """The quantized model (in memory, for ``graph.save``) and a report; ``src`` is left as it was."""
    import onnx

    if scheme not in SCHEMES:
        raise ExportError(f"unknown quantization {scheme!r}; choose one of {', '.join(SCHEMES)}")
    with tempfile.TemporaryDirectory(dir=src.parent, prefix=".quant-") as work:
        out = Path(work) / "model.onnx"
        try:
            method = _quantize(src, out, scheme)
        except Exception as exc:  # onnxruntime's quantizers raise plain RuntimeError/ValueError
            raise ExportError(f"{scheme} quantization failed in onnxruntime's quantizer: {exc}") from exc
        model = onnx.load(str(out), load_external_data=True)
    weights = sum(t.ByteSize() for t in model.graph.initializer)
    return model, {"scheme": scheme, "method": method, "weight_bytes": weights}


def _quantize(src: Path, out: Path, scheme: str) -> str:
    if scheme == "int4":
        return _int4(src, out)
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # DefaultTensorType: shape inference cannot type the outputs of contrib operators
    # (GroupQueryAttention, SkipSimplifiedLayerNormalization); they are all float32 here.
    # per_channel: one scale per output column; q, k and v share one fused weight whose parts
    # have different ranges, and a single per-tensor scale loses the smaller ones.
    quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                     per_channel=True, use_external_data_format=True,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return "onnxruntime quantize_dynamic, MatMul weights, QInt8 per output channel"
