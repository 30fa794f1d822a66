"""Weight quantization of an exported graph with onnxruntime's own quantizer (no hand-written kernels).

int8: dynamic quantization of the MatMul weights (activations are quantized on the fly), which
onnxruntime runs with MatMulInteger on every CPU and on mobile builds; the KV cache and the
graph's inputs and outputs stay float32, so the runtime drives it unchanged.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from edgelm.runtime.errors import ExportError

SCHEMES = ("int8",)


def quantize_model(src: Path, dst: Path, scheme: str) -> dict[str, object]:
    if scheme not in SCHEMES:
        raise ExportError(f"unknown quantization {scheme!r}; choose one of {', '.join(SCHEMES)}")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = dst.with_name(dst.name + ".tmp")
    quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    shutil.move(str(tmp), str(dst))
    return {"scheme": scheme, "method": "onnxruntime quantize_dynamic, MatMul weights, QInt8",
            "float32_bytes": src.stat().st_size if src.exists() else None, "bytes": dst.stat().st_size}
