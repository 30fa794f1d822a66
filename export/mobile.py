"""ORT format for devices, with onnxruntime's own converter.

``model.ort`` is what ONNX Runtime Mobile (the Android AAR, the iOS pod, onnxruntime-react-native)
loads fastest and what a reduced-size build requires; ``required_operators.config`` lists the
operators (and with type reduction, the types) the model needs, to pass to onnxruntime's
``build.py --include_ops_by_config`` for a minimal build. We shell out to
``python -m onnxruntime.tools.convert_onnx_models_to_ort`` rather than reimplementing it: the
converter's optimizations must match the runtime's kernels of the same onnxruntime release.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from edgelm.runtime.errors import ExportError

ORT_FILE = "model.ort"
OPS_CONFIG = "required_operators.config"


def convert_to_ort(onnx_path: Path, out_dir: Path, target_platform: str = "arm",
                   log: Callable[[str], None] = print) -> dict[str, object]:
    """Write ``model.ort`` and ``required_operators.config`` beside the ONNX model in ``out_dir``.

    The "Fixed" optimization style bakes onnxruntime's graph optimizations into the file, the
    right choice for the CPU and XNNPACK providers; ``target_platform="arm"`` keeps x86-only
    layout transforms out so the same file runs on phones (and still here).
    """
    data = onnx_path.with_name(onnx_path.name + ".data")
    if onnx_path.stat().st_size + (data.stat().st_size if data.exists() else 0) >= 2 * 1024**3:
        raise ExportError("the ORT format cannot hold models above 2 GB; quantize (--quantize int8/int4) before --mobile")
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".ort-") as work:
        work = Path(work)
        src = work / "in" / onnx_path.name
        src.parent.mkdir()
        # The converter processes every .onnx in a folder; give it a folder with just this model
        # (and its external data file, which the .ort file takes in).
        for path in (onnx_path, onnx_path.with_name(onnx_path.name + ".data")):
            if path.exists():
                try:
                    (src.parent / path.name).hardlink_to(path)
                except OSError:
                    shutil.copy2(path, src.parent / path.name)
        cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(src.parent),
               "--output_dir", str(work / "out"), "--optimization_style", "Fixed",
               "--target_platform", target_platform, "--enable_type_reduction"]
        log(f"      converting to ORT format ({target_platform}, Fixed optimizations, type reduction)")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        produced = work / "out" / (onnx_path.stem + ".ort")
        if proc.returncode != 0 or not produced.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise ExportError(f"onnxruntime's ORT converter failed: {' | '.join(tail)}")
        ops = work / "out" / OPS_CONFIG
        if not ops.is_file():
            found = sorted((work / "out").glob("*.config"))
            if not found:
                raise ExportError("onnxruntime's ORT converter wrote no required operators config")
            ops = found[0]
        shutil.move(str(produced), out_dir / ORT_FILE)
        shutil.move(str(ops), out_dir / OPS_CONFIG)
    return {"file": ORT_FILE, "bytes": (out_dir / ORT_FILE).stat().st_size, "operators_config": OPS_CONFIG,
            "target_platform": target_platform, "optimization_style": "Fixed"}
