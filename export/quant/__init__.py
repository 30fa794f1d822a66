"""Weight quantization schemes for exported graphs, one module each, chosen by name.

=============  ==========================================================================
scheme         what the graph holds
=============  ==========================================================================
gguf           the GGUF file's own blocks (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, Q2_K..Q6_K) carried
               over exactly: the weights computed with equal the GGUF's dequantized ones
               (an untied embedding table holds Q5_0 codes as 4 bits + a bit plane,
               its GGUF size, and Q6_K codes as 4 + 2 bits)
int8           weight-only 8-bit blocks (MatMulNBits) with integer zero points, 64 in the
               layers and 32 in the embedding / LM head; activation outliers of the
               normalized layer inputs first moved into the weights (``smooth``)
int4           weight-only 4-bit blocks of 32 with integer zero points
               (both: scale and zero point searched per block, then codes rounded by
               GPTQ, from calibration activations; see ``search`` and ``gptq``;
               ``--block-size`` sets the layers' block instead)
int8-dynamic   onnxruntime's dynamic MatMulInteger (int8 weights and activations), for
               ONNX Runtime Mobile builds without MatMulNBits
=============  ==========================================================================

All but ``int8-dynamic`` quantize the embedding table and the LM head too (a tied table is
stored once, quantized, and read by both GatherBlockQuantized and MatMulNBits). Every
quantized export then measures its perplexity against its own float32 graph (``quality``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edgelm.runtime.errors import ExportError

SCHEMES = {
    "gguf": "the GGUF's own quantized blocks, carried over exactly (GGUF sources only)",
    "int8": "weight-only 8-bit blocks (by default 64 in the layers, 32 in the embedding and LM head), activation outliers of the normalized layer inputs moved into the weights (SmoothQuant), scales searched and codes rounded by GPTQ on calibration activations",
    "int4": "weight-only 4-bit blocks (by default 32), scales and zero points searched and codes rounded by GPTQ on calibration activations",
    "int8-dynamic": "onnxruntime dynamic MatMulInteger int8 (for ONNX Runtime Mobile builds without MatMulNBits)",
}


BLOCK_SCHEMES = ("gguf", "int8", "int4")
"""The schemes that write MatMulNBits / GatherBlockQuantized (contrib operators a runtime must know)."""
SIZED_SCHEMES = ("int8", "int4")
"""The schemes whose layers' block size ``--block-size`` chooses (a GGUF's blocks are the file's)."""
BLOCK_SIZES = (16, 32, 64, 128, 256)
"""What onnxruntime's MatMulNBits takes: a power of two from 16."""


@dataclass
class Context:
    """What a scheme may need besides the float graph."""

    gguf_file: Path | None = None
    calibration_ids: list[int] | None = None
    vocab_size: int | None = None
    max_positions: int | None = None
    block_size: int | None = None
    """The layers' block size for ``int8`` / ``int4`` (None: the scheme's own); the embedding / LM head keeps 32."""
    log: Callable[[str], None] = print


def method(scheme: str, block_size: int | None = None) -> str:
    """What ``scheme`` does, as the export log and ``edgelm.json`` say it, with a chosen block size."""
    chosen = "" if block_size is None else f"; layers in blocks of {block_size} (--block-size) where their inputs allow"
    return SCHEMES[scheme] + chosen


def check(scheme: str, gguf_file: Path | None, block_size: int | None = None) -> None:
    """Refuse an unknown scheme, ``gguf`` for a source that is not a GGUF file, or a block size the scheme or
    MatMulNBits cannot take, before any work starts."""
    if scheme not in SCHEMES:
        raise ExportError(f"unknown quantization {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if block_size is not None:
        if scheme not in SIZED_SCHEMES:
            raise ExportError(f"--block-size applies to --quantize {' or '.join(SIZED_SCHEMES)}, not {scheme} "
                              "(a GGUF's blocks are the file's own; int8-dynamic has none)")
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size not in BLOCK_SIZES:
            raise ExportError(f"--block-size {block_size!r}: onnxruntime's MatMulNBits takes "
                              f"{', '.join(map(str, BLOCK_SIZES))}")
    if scheme == "gguf" and gguf_file is None:
        raise ExportError("--quantize gguf carries over a GGUF file's quantized blocks, but the source is a checkpoint "
                          "folder; export the .gguf file itself, or use --quantize int8 or int4")


def quantize_file(src: Path, out: Path, scheme: str, ctx: Context) -> dict[str, Any]:
    """Write the ``scheme`` quantization of the float graph ``src`` to ``out``; returns the report."""
    check(scheme, ctx.gguf_file, ctx.block_size)
    if scheme == "int8-dynamic":
        from edgelm.export.quant import dynamic

        try:
            report = dynamic.quantize_file(src, out)
        except Exception as exc:  # onnxruntime's quantizers raise plain RuntimeError/ValueError
            raise ExportError(f"{scheme} quantization failed in onnxruntime's quantizer: {exc}") from exc
        return {"scheme": scheme, **report}
    return _rewrite_file(src, out, scheme, ctx)


def _scheme(name: str, src: Path, ctx: Context):
    if name == "gguf":
        from edgelm.export.quant.gguf import GGUFScheme

        return GGUFScheme(ctx.gguf_file, log=ctx.log)
    from edgelm.export.quant import calibrate
    from edgelm.export.quant.int4 import Int4Scheme
    from edgelm.export.quant.int8 import Int8Scheme

    window = min(512, ctx.max_positions or 512)
    acts = calibrate.activations(src, ctx.calibration_ids, window) if ctx.calibration_ids else {}
    if acts:
        ctx.log(f"      calibration: {len(ctx.calibration_ids)} tokens of the built-in text, "
                f"{len(acts)} weight inputs measured")
    else:
        ctx.log("      calibration: not run on this graph (static shapes or not a causal LM); the search weighs "
                "every input alike")
    scheme = {"int8": Int8Scheme, "int4": Int4Scheme}[name](acts)
    if ctx.block_size is not None:
        scheme.linear_block = ctx.block_size
    return scheme


def _rewrite_file(src: Path, out: Path, name: str, ctx: Context) -> dict[str, Any]:
    from edgelm.export import graph, onnx_files
    from edgelm.export.quant.rewrite import rewrite

    scheme = _scheme(name, src, ctx)
    model = onnx_files.load_graph(src)  # float weights stay on disk, mapped one matrix at a time
    smoothed = 0
    if getattr(scheme, "smooth_alpha", None):
        from edgelm.export.quant.smooth import smooth

        smoothed = smooth(model, scheme.activations, scheme.smooth_alpha, log=ctx.log)
    report = rewrite(model, scheme, vocab_size=ctx.vocab_size, log=ctx.log)
    if not report.quantized:
        raise ExportError(f"--quantize {name} found no weight matrix it could quantize in this model")
    graph.save(model, out)
    result: dict[str, Any] = {
        "scheme": name,
        "method": method(name, ctx.block_size),
        "weights": report.quantized,
        "kept_float32": report.kept_float,
        "weight_bytes": report.weight_bytes,
    }
    if smoothed:
        result["smoothed"] = {"activations": smoothed, "alpha": scheme.smooth_alpha}
    if name in SIZED_SCHEMES:
        result["block_size"] = {"layers": scheme.linear_block or scheme.block, "embedding_and_head": scheme.block,
                                "chosen": ctx.block_size is not None}
    if name == "gguf":
        result["gguf_file"] = str(ctx.gguf_file)
        result["max_relative_difference_to_gguf"] = scheme.max_rel_diff
        if scheme.unsupported:
            result["gguf_formats_kept_float32"] = scheme.unsupported
    return result
