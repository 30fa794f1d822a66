"""``export_model``: source -> validated output folder, all or nothing."""

from __future__ import annotations

import errno
import gc
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from edgelm.models.cache import atomic_dir
from edgelm.runtime.errors import ExportError
from edgelm.runtime.manifest import MANIFEST_NAME, Manifest, _as_list

MODEL_FILE = "model.onnx"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgelm")
    except PackageNotFoundError:
        return "0+unknown"


def _consolidate(raw_dir: Path, out_dir: Path, tie: bool, inputs: list[str],
                 keep_logits: bool) -> tuple[bool, list[str]]:
    """The traced graph into ``out_dir`` (external data when large), tied embedding shared if ``tie``, every
    declared ``position_ids`` input present (see ``graph.restore_position_ids``), and an optional
    ``logits_to_keep`` input if ``keep_logits`` so that a prefill computes the LM head for its last
    position only (``graph.add_logits_to_keep``). Static-shape graphs go without: a data-dependent
    slice would give their logits a dynamic shape. Returns whether the embedding was shared, and the
    graph's inputs (``inputs`` plus ``logits_to_keep`` when added).

    ``int8-dynamic`` keeps the LM head as its own MatMul (onnxruntime's dynamic quantizer only
    rewrites MatMul, and a float32 head would be the biggest weight read per token); the other
    schemes quantize the shared table once for both the lookup and the head.
    """
    from edgelm.export import graph, onnx_files

    model = onnx_files.load_graph(raw_dir / MODEL_FILE)
    tied = tie and graph.share_tied_embedding(model)
    graph.restore_position_ids(model, inputs)
    if keep_logits and graph.add_logits_to_keep(model):
        inputs = [*inputs, graph.LOGITS_TO_KEEP]
    graph.save(model, out_dir / MODEL_FILE)
    return tied, inputs


def _free(src: Any) -> None:
    """Drop the PyTorch model and hand its memory back to the system before onnxruntime loads the graph.

    glibc keeps freed heap pages for reuse unless asked; ``malloc_trim`` returns them, so the
    peak of the onnxruntime steps that follow does not sit on top of the float32 weights.
    """
    import ctypes
    import ctypes.util

    src.model = None
    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc:
        try:
            ctypes.CDLL(libc).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (macOS, musl): the allocator keeps what it keeps
            pass


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _special_ids(src: Any) -> tuple[list[int], int | None, int | None]:
    gen = getattr(src.model, "generation_config", None)
    eos = _as_list(getattr(gen, "eos_token_id", None)) or _as_list(src.config.eos_token_id) or _as_list(src.tokenizer.eos_token_id)
    pad = getattr(gen, "pad_token_id", None)
    pad = pad if pad is not None else src.config.pad_token_id if src.config.pad_token_id is not None else src.tokenizer.pad_token_id
    bos = getattr(gen, "bos_token_id", None)
    bos = bos if bos is not None else src.config.bos_token_id
    return eos, (int(pad) if pad is not None else None), (int(bos) if bos is not None else None)


_DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
FLOAT_DIR = ".float32"
"""Where a quantized export keeps its validated float32 graph until the quantized one is measured against it."""


def _compact_json(path: Path) -> None:
    """Rewrite a JSON file without its indentation: the same content (key order kept), about half the bytes for
    a tokenizer.json, which transformers writes indented (Qwen2.5's: 11.4 MB -> 5.4 MB; a 1.25x-of-the-GGUF
    folder budget feels that)."""
    if path.is_file():
        content = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(json.dumps(content, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")


def _weights_line(report: dict[str, Any]) -> str:
    parts = ", ".join(f"{kind}: {n / 1e6:.1f}M" for kind, n in (report.get("weights") or {}).items())
    kept = report.get("kept_float32") or []
    return (f"weights {parts or report.get('method', '')}; {len(kept)} matrices kept float32"
            + (f" ({', '.join(kept[:3])}{', ...' if len(kept) > 3 else ''})" if kept else ""))


def _measure_quality(folder: Path, manifest: Manifest, max_quality_loss: float | None,
                     log: Callable[[str], None]) -> None:
    from edgelm.export import quality

    log("      measuring the quantized graph against the float32 one on the built-in text ...")
    report = quality.compare(folder, manifest, f"{FLOAT_DIR}/{MODEL_FILE}")
    manifest.validation["quality"] = report
    log(f"      {report['measure']} {report['perplexity']:.3f} vs float32 {report['float32_perplexity']:.3f} "
        f"over {report['tokens']} tokens: ratio {report['ratio']:.4f}, "
        f"mean KL divergence from float32 {report['kl_divergence']:.4f} nats")
    if max_quality_loss is not None and report["ratio"] > 1 + max_quality_loss:
        raise ExportError(
            f"the {manifest.validation['quantization']['scheme']} export loses {100 * (report['ratio'] - 1):.2f}% "
            f"perplexity against float32, more than --max-quality-loss {max_quality_loss:g} allows: nothing was "
            "written; try --quantize int8 (or gguf for a GGUF source), or raise the limit")


def resolve_quantize(quantize: str | None, source: str | Path) -> str | None:
    """The scheme an export uses: ``"auto"`` is ``gguf`` for a .gguf source (its blocks carried over exactly,
    at the GGUF's size) and float32 otherwise; ``None`` and ``"none"`` mean float32."""
    if quantize in (None, "none"):
        return None
    if quantize == "auto":
        return "gguf" if Path(source).suffix.lower() == ".gguf" else None
    return quantize


def export_model(
    source: str | Path,
    output_dir: str | Path,
    task: str | None = None,
    overwrite: bool = False,
    opset: int = 17,
    quantize: str | None = "auto",
    mobile: bool = False,
    static_max_length: int | None = None,
    fuse: bool | None = None,
    max_quality_loss: float | None = None,
    tokenizer_options: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
    block_size: int | None = None,
    greedy_head: bool = True,
) -> Manifest:
    """Export a checkpoint folder or GGUF file to a validated ONNX folder the runtime can load.

    The folder appears only once the export validated: everything is written to a temporary
    folder beside ``output_dir`` and renamed at the end, so an error, a kill or a full disk
    leaves no half-written output.

    ``quantize``: a scheme of ``edgelm.export.quant`` (``gguf``, ``int8``, ``int4``,
    ``int8-dynamic``), ``"auto"`` (``gguf`` for a GGUF source, else float32) or None/"none".
    The float32 graph is validated against PyTorch first; the quantized one is then measured
    against it (perplexity ratio on a built-in text, in the manifest), and ``max_quality_loss``
    (e.g. 0.02 for 2%) stops the export, writing nothing, when the ratio exceeds 1 + that.
    ``block_size`` (``int8`` / ``int4``): the layers' block size instead of the scheme's own (64 / 32),
    halved where a matrix's input size needs it; larger blocks read fewer scales per token and lose more
    (README, Quantization, has SmolLM2's figures). The embedding / LM head table keeps 32.

    ``greedy_head`` (float32 causal exports with dynamic shapes, not ``mobile``): add the greedy head
    (``export.greedy_head``), which gives greedy search the exact argmax without reading the float32
    LM head: an 8-bit copy of the head plus a bound, 35 MB more for SmolLM2. Quantized exports read
    their head quantized already and go without.

    ``tokenizer_options``: keyword arguments for the tokenizer's ``from_pretrained`` (e.g.
    ``{"do_lower_case": False}``); the tokenizer is checked against transformers before anything else.

    ``fuse`` (default: on, except with ``mobile``) fuses Llama-family attention into onnxruntime's
    contrib operators. ORT-format files are only read by onnxruntime releases at least as new as
    the converter, and contrib operators gain attributes between releases (a 1.32 ``.ort`` with
    GroupQueryAttention fails in ONNX Runtime Mobile 1.24, the current React Native package), so
    mobile exports keep standard operators unless ``fuse=True`` is asked for.
    """
    try:
        return _export(source, output_dir, task, overwrite, opset, resolve_quantize(quantize, source), mobile,
                       static_max_length, fuse, max_quality_loss, tokenizer_options, log, block_size, greedy_head)
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            raise ExportError(
                f"ran out of disk space while writing {output_dir} ({exc.strerror}); free some space or choose "
                "another output folder: nothing was written") from None
        raise


def _export(source: str | Path, output_dir: str | Path, task: str | None, overwrite: bool, opset: int,
            quantize: str | None, mobile: bool, static_max_length: int | None, fuse: bool | None,
            max_quality_loss: float | None, tokenizer_options: dict[str, Any] | None,
            log: Callable[[str], None], block_size: int | None = None, greedy_head: bool = True) -> Manifest:
    from edgelm.export import quant
    from edgelm.export.source import load_source

    output_dir = Path(output_dir)
    if block_size is not None and not quantize:
        raise ExportError("--block-size applies to a quantized export; add --quantize int8 or int4")
    if quantize:
        quant.check(quantize, Path(source) if Path(source).suffix.lower() == ".gguf" else None, block_size)
    if max_quality_loss is not None:
        if not quantize:
            raise ExportError("--max-quality-loss applies to a quantized export; add --quantize")
        if not isinstance(max_quality_loss, (int, float)) or not max_quality_loss >= 0:
            raise ExportError(f"--max-quality-loss takes a non-negative fraction (0.02 = 2% more perplexity), "
                              f"got {max_quality_loss!r}")
    if static_max_length is not None and (not isinstance(static_max_length, int) or static_max_length < 8):
        raise ExportError(f"--max-length must be an integer of at least 8 for a static-shape export, got {static_max_length!r}")
    if output_dir.exists() and not overwrite:
        raise ExportError(f"{output_dir} already exists; pass --overwrite to replace it")
    start = time.perf_counter()
    fused_op = None
    if fuse is None:
        fuse = not mobile
    log(f"[1/4] loading {source}")
    src = load_source(source, task, tokenizer_options, log)
    check = src.tokenizer_report
    log(f"      tokenizer: {check['text_lines_equal']}/{check['text_lines']} sample lines encode as in transformers; "
        f"{check['vocab_round_trip']:.0%} of {check['vocab_tokens_tried']} vocabulary tokens encode back to "
        f"themselves, {check['vocab_unknown']:.1%} to the unknown token")
    config = src.config
    if static_max_length is not None:
        if src.task != "causal-lm":
            raise ExportError("--static-shapes applies to causal LMs (a masked LM has no KV cache); drop it")
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if limit and static_max_length > limit:
            raise ExportError(f"--max-length {static_max_length} exceeds the model's {limit} positions; lower it")
    # PyTorch's outputs for validation come first: the model can then be freed as soon as it is traced, and
    # onnxruntime never loads the graph while the PyTorch weights are still in memory.
    from edgelm.export import validate

    if static_max_length is not None:
        from edgelm.export.static import static_reference

        reference = static_reference(src.model, src.tokenizer, static_max_length)
    elif src.task == "causal-lm":
        from edgelm.export.fused import will_fuse

        reference = validate.causal_reference(src.model, src.tokenizer, fused=will_fuse(src.model, fuse))
    else:
        from edgelm.export.masked import masked_input_names

        reference = validate.masked_reference(src.model, src.tokenizer, masked_input_names(src.model, src.tokenizer))
    with atomic_dir(output_dir, overwrite=overwrite) as tmp:
        raw_dir = tmp / ".onnx-raw"
        raw_dir.mkdir()
        log(f"[2/4] exporting {config.model_type} ({src.task}) to ONNX, opset {opset}")
        if static_max_length is not None:
            from edgelm.export.causal import layer_windows
            from edgelm.export.static import export_static

            layout, inputs, outputs = export_static(src.model, raw_dir / MODEL_FILE, static_max_length, opset=opset)
        elif src.task == "causal-lm":
            from edgelm.export.causal import export_causal, layer_windows

            layout, inputs, outputs, fused_op = export_causal(src.model, raw_dir / MODEL_FILE, opset, fuse=fuse)
            if fused_op:
                log(f"      attention fused into onnxruntime's {fused_op} (packed q/k/v, rotary inside)")
        else:
            from edgelm.export.masked import export_masked

            inputs, outputs = export_masked(src.model, src.tokenizer, raw_dir / MODEL_FILE, opset)
        # What the rest needs of the PyTorch model; then the model goes (see ``_free``).
        vocab_size = int(src.model.get_output_embeddings().weight.shape[0])
        architecture = (config.architectures or [type(src.model).__name__])[0]
        generation_config = getattr(src.model, "generation_config", None) if src.task == "causal-lm" else None
        special = _special_ids(src)
        _free(src)
        tied, inputs = _consolidate(raw_dir, tmp, tie=quantize != "int8-dynamic", inputs=inputs,
                                    keep_logits=src.task == "causal-lm" and static_max_length is None)
        if tied:
            log("      tied embedding stored once (the LM head multiplies by the embedding table)")
        shutil.rmtree(raw_dir)
        graph_report = None
        if fused_op:
            from edgelm.export import graph

            graph_report = graph.optimize_offline(tmp / MODEL_FILE)
            log(f"      optimized offline: {graph_report['nodes_before']} -> {graph_report['nodes_after']} nodes "
                f"(onnxruntime extended level; {graph_report['skip_rms_norm_fused']} residual adds fused into "
                "SkipSimplifiedLayerNormalization)")
        head_report = None
        if greedy_head and not quantize and not mobile and src.task == "causal-lm" and static_max_length is None:
            from edgelm.export import graph, onnx_files
            from edgelm.export.greedy_head import IDS, INPUT, LOGITS, add_greedy_head

            model = onnx_files.load_graph(tmp / MODEL_FILE)
            head_report = add_greedy_head(model)
            if head_report:
                graph.save(model, tmp / MODEL_FILE)
                inputs, outputs = [*inputs, INPUT], [*outputs, IDS, LOGITS]
                log(f"      greedy head added: an 8-bit copy of the LM head and a bound ({head_report['bytes'] / 1e6:.1f} MB) "
                    "give greedy search the float32 head's argmax without reading it")
            del model
        log("[3/4] validating against PyTorch's outputs")
        if static_max_length is not None:
            from edgelm.export.static import check_static

            report = check_static(tmp / MODEL_FILE, reference, layout, static_max_length, validate.LOGITS_ATOL)
        elif src.task == "causal-lm":
            report = validate.check_causal(tmp / MODEL_FILE, reference)
        else:
            report = validate.check_masked(tmp / MODEL_FILE, reference)
        del reference
        log(f"      logits max abs diff {report['max_abs_diff_logits']:.2e} (limit {report['logits_atol']})")
        quant_report = None
        float_dir = tmp / FLOAT_DIR
        if quantize:
            from edgelm.export import graph

            log(f"      quantizing weights ({quantize}: {quant.method(quantize, block_size)}); the float32 graph above "
                "is what was validated")
            float_dir.mkdir()
            for name in (MODEL_FILE, graph.EXTERNAL_DATA):
                if (tmp / name).exists():
                    (tmp / name).rename(float_dir / name)
            from edgelm.export.quant.calibrate import builtin_text

            calibration = src.tokenizer(builtin_text("calibration.txt"))["input_ids"]
            ctx = quant.Context(gguf_file=Path(source) if src.gguf_file else None, calibration_ids=list(calibration),
                                vocab_size=vocab_size if src.task == "causal-lm" else None,
                                max_positions=getattr(config, "max_position_embeddings", None), block_size=block_size,
                                log=log)
            quant_report = quant.quantize_file(float_dir / MODEL_FILE, tmp / MODEL_FILE, quantize, ctx)
            log(f"      {_weights_line(quant_report)}")
        mobile_report = None
        needs_new_ort = bool(fused_op) or quantize in quant.BLOCK_SCHEMES
        if mobile:
            from edgelm.export.mobile import convert_to_ort

            if needs_new_ort:
                log("      note: this model.ort uses contrib operators whose attributes change between onnxruntime "
                    "releases: the app needs ONNX Runtime Mobile at least as new as this converter "
                    f"(onnxruntime {_ort_version()})")
            mobile_report = convert_to_ort(tmp / MODEL_FILE, tmp, log=log)
            mobile_report["min_onnxruntime"] = _ort_version() if needs_new_ort else None
        log("[4/4] writing tokenizer, configs and manifest")
        src.tokenizer.save_pretrained(tmp)
        if not (tmp / "tokenizer.json").is_file():
            raise ExportError("the tokenizer did not save a tokenizer.json, which the runtime needs")
        for name in ("tokenizer.json", "vocab.json"):
            _compact_json(tmp / name)
        config.save_pretrained(tmp)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        eos, pad, bos = special
        manifest = Manifest(
            task=src.task,
            architecture=architecture,
            model_type=config.model_type,
            model_file=MODEL_FILE,
            inputs=inputs,
            outputs=outputs,
            vocab_size=vocab_size,
            hidden_size=int(getattr(config, "hidden_size", 0) or getattr(config, "dim", 0) or getattr(config, "n_embd", 0)),
            num_attention_heads=int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_heads", 0)
                                    or getattr(config, "n_head", 0)),
            max_position_embeddings=getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None),
            eos_token_id=eos,
            pad_token_id=pad,
            bos_token_id=bos,
            edgelm_version=_version(),
            source=str(source),
            validation=report,
            dtype="float32" if not quantize else f"{quantize} weights, float32 activations",
        )
        manifest.validation["tokenizer"] = src.tokenizer_report
        if quant_report:
            manifest.validation["quantization"] = quant_report
        if graph_report:
            manifest.validation["offline_optimization"] = graph_report
        if head_report:
            manifest.validation["greedy_head"] = {**head_report, **report.pop("greedy_head", {})}
        if mobile_report:
            manifest.variants["ort"] = mobile_report["file"]
            manifest.validation["mobile"] = mobile_report
        if static_max_length is not None:
            manifest.static_max_length = static_max_length
            manifest.static_batch = 1
        if src.task == "causal-lm":
            manifest.num_layers = layout.num_layers
            manifest.num_key_value_heads = layout.num_kv_heads
            manifest.head_dim = layout.head_dim
            windows = [w for w in layer_windows(config) if w is not None]
            manifest.sliding_window = windows[0] if windows else None
            manifest.attention = fused_op or "onnx"

        if quantize:
            (tmp / MANIFEST_NAME).write_text(manifest.to_json())  # the runtime reads it to measure both graphs
            _measure_quality(tmp, manifest, max_quality_loss, log)
            shutil.rmtree(float_dir)
        manifest.export_seconds = round(time.perf_counter() - start, 1)
        (tmp / MANIFEST_NAME).write_text(manifest.to_json())
    log(f"done in {manifest.export_seconds:.1f}s: {output_dir}")
    return manifest
