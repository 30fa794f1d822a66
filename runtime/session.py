"""onnxruntime sessions: provider names, fallbacks and options in one place.

Users say "cpu", "cuda", "xnnpack", "nnapi", "coreml" or "qnn" (or onnxruntime's own
provider names, or (name, options) pairs). A provider this onnxruntime build lacks is
not an error: the session falls back to CPU and a warning names the missing provider
and the package that has it, so the same script runs on a laptop and on a phone.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import onnxruntime as ort

from edgelm.runtime import load_cache
from edgelm.runtime.errors import ModelLoadError, ProviderError

ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "dml": "DmlExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}
PACKAGES = {
    "CUDAExecutionProvider": "onnxruntime-gpu (Linux/Windows with an NVIDIA GPU)",
    "TensorrtExecutionProvider": "onnxruntime-gpu built with TensorRT",
    "XnnpackExecutionProvider": "onnxruntime-android / onnxruntime-mobile (Android AAR or iOS pod) or a build with --use_xnnpack",
    "NnapiExecutionProvider": "onnxruntime-android (the Android AAR)",
    "CoreMLExecutionProvider": "onnxruntime on macOS, or onnxruntime-objc / onnxruntime-c on iOS",
    "QNNExecutionProvider": "onnxruntime-qnn (Qualcomm Snapdragon devices)",
    "DmlExecutionProvider": "onnxruntime-directml (Windows)",
    "OpenVINOExecutionProvider": "onnxruntime-openvino",
}
ProviderSpec = Union[str, tuple[str, dict], Sequence[Union[str, tuple[str, dict]]]]


def resolve_providers(provider: ProviderSpec) -> list[tuple[str, dict]]:
    """Normalise a provider spec to onnxruntime's (name, options) list, falling back to CPU when needed."""
    if isinstance(provider, (str, tuple)):
        specs = [provider]
    else:
        specs = list(provider)
    if not specs:
        raise ProviderError("provider list is empty; use 'cpu'")
    available = set(ort.get_available_providers())
    known = set(ALIASES.values()) | available
    out: list[tuple[str, dict]] = []
    for spec in specs:
        name, options = (spec if isinstance(spec, tuple) else (spec, {}))
        if not isinstance(name, str):
            raise ProviderError(f"provider must be a name or a (name, options) pair, got {spec!r}")
        full = ALIASES.get(name.lower(), name)
        if full not in known:
            raise ProviderError(
                f"unknown execution provider {name!r}; choose from {', '.join(sorted(ALIASES))} "
                "(or an onnxruntime provider name)"
            )
        if full not in available:
            warnings.warn(
                f"{full} is not in this onnxruntime build (available: {', '.join(sorted(available))}); "
                f"it comes with {PACKAGES.get(full, 'another onnxruntime package')}. Falling back to CPU.",
                RuntimeWarning, stacklevel=3,
            )
            continue
        out.append((full, dict(options or {})))
    if not any(n == "CPUExecutionProvider" for n, _ in out):
        out.append(("CPUExecutionProvider", {}))
    return out


def session_options(threads: int | None = None, optimization: str = "all") -> ort.SessionOptions:
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if optimization not in levels:
        raise ProviderError(f"graph optimization level must be one of {', '.join(levels)}, got {optimization!r}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[optimization]
    if threads is not None:
        if not isinstance(threads, int) or threads < 0:
            raise ProviderError(f"threads must be a non-negative integer (0 = onnxruntime's default), got {threads!r}")
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    for key, value in edgelm_session_entries().items():
        opts.add_session_config_entry(key, value)
    return opts


SPINNING_STOP_ENV = "EDGELM_FORCE_SPINNING_STOP"
"""Every session's intra-op workers stop spinning when its Run returns (``session.force_spinning_stop``).

Each session owns a thread pool whose workers busy-wait for a while after a Run in case more work
comes. When two models take turns, as a draft and its target do once per drafted token, each then
runs beside the other's spinning workers: on the 2-core benchmark machine the Qwen2.5-Coder pair
then gave 1.31x plain greedy instead of 1.59x on code completion (README, speculative decoding). One model
decoding alone measured the same either way, since the pool still spins between the operators of a Run.
Set EDGELM_FORCE_SPINNING_STOP=0 to get onnxruntime's default."""

PARALLEL_PREPACK_ENV = "EDGELM_PARALLEL_PREPACK"
"""EDGELM_PARALLEL_PREPACK=1: sessions prepack their weights on the intra-op thread pool
(``session.prepack.enable_parallel``). Off by default.

onnxruntime repacks every MatMul/MatMulNBits weight into its kernels' layout when a session loads,
one weight after another by default, and that is most of a quantized model's load. In parallel it
packs the same bytes faster, but it holds the unpacked and the packed weights at once:
`EDGELM_PARALLEL_PREPACK=1 benchmarks/run.sh 5` loaded SmolLM2 float32 in 0.54x genai's time with a
peak RSS of 1111 MB, where the default run loads in 0.76x with 723 MB (README, Performance); memory
once loaded is the same. On a phone the peak is what gets an app killed, so it is for machines that
reload models often and have memory to spare."""

SESSION_ENTRIES = {
    "session.force_spinning_stop": (SPINNING_STOP_ENV, "1"),
    "session.prepack.enable_parallel": (PARALLEL_PREPACK_ENV, "0"),
}
"""Session config entries edgelm decides: entry -> (environment variable, edgelm's default). "1" sets the entry,
"0" leaves onnxruntime's default; benchmark reports read them back from the session."""


def edgelm_session_entries() -> dict[str, str]:
    """The session config entries to set, after the environment's choices."""
    out = {}
    for key, (env, default) in SESSION_ENTRIES.items():
        value = os.environ.get(env, default)
        if value not in ("0", "1"):
            raise ProviderError(f"{env}={value!r}: use 1 to set onnxruntime's {key}, 0 to leave it unset")
        if value == "1":
            out[key] = "1"
    return out


def read_back_entries(session: ort.InferenceSession) -> dict[str, int]:
    """What a session really runs with for each entry edgelm decides (0: onnxruntime's own default)."""
    opts = session.get_session_options()
    out = {}
    for key in SESSION_ENTRIES:
        try:
            out[key.removeprefix("session.")] = int(opts.get_session_config_entry(key))
        except Exception:  # onnxruntime raises for an entry never set: its default applies
            out[key.removeprefix("session.")] = 0
    return out


def options_factory(threads: int | None, optimization: str,
                    extra_options: dict[str, Any] | None = None) -> Callable[[], ort.SessionOptions]:
    """Makes fresh SessionOptions with edgelm's settings plus ``extra_options`` (session config entries): a load
    cache's reading, writing and background-writing sessions each need options of their own, all alike."""

    def make() -> ort.SessionOptions:
        opts = session_options(threads, optimization)
        for key, value in (extra_options or {}).items():
            opts.add_session_config_entry(key, str(value))
        return opts

    return make


def create_session(path: Path, provider: ProviderSpec = "cpu", threads: int | None = None,
                   optimization: str = "all", extra_options: dict[str, Any] | None = None,
                   use_cache: bool | str | None = False) -> ort.InferenceSession:
    """An InferenceSession for ``path``; damaged or missing files become a ModelLoadError naming the file.

    ``use_cache`` (what ``load_cache.mode`` takes: None for ``$EDGELM_LOAD_CACHE``, True, "sync", False):
    a plain CPU session of an ``.onnx`` graph goes through ``load_cache`` (onnxruntime's prepacked graph saved
    after or during the first load, read back on later ones); off for graphs still being written (an export
    measuring itself in its temporary folder).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file {path} is missing; re-export the model")
    if os.path.getsize(path) == 0:
        raise ModelLoadError(f"model file {path} is empty; re-export the model")
    providers = resolve_providers(provider)

    make_options = options_factory(threads, optimization, extra_options)
    opts = make_options()  # a bad setting is refused here, before anything loads
    names = [n for n, _ in providers]
    how = load_cache.mode(use_cache)
    cached = (how != "off" and names == ["CPUExecutionProvider"] and not providers[0][1] and path.suffix == ".onnx"
              and optimization != "disable")
    try:
        if cached:
            return load_cache.session(path, make_options, optimization, names, how,
                                      {k: str(v) for k, v in (extra_options or {}).items()})
        return ort.InferenceSession(str(path), opts, providers=names,
                                    provider_options=[o for _, o in providers])
    except Exception as exc:  # onnxruntime raises its own exception types for every load failure
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = "the file is truncated or corrupt, or its external data file is missing"
        raise ModelLoadError(f"onnxruntime cannot load {path}: {msg} ({hint}; re-export the model)") from exc
