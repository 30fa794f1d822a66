"""A per-device cache of onnxruntime's optimized, prepacked form of a graph: later loads skip that work.

Most of a session's load is onnxruntime optimizing the graph and then repacking every MatMul and
MatMulNBits weight into its CPU kernels' layout, one weight after another, into fresh memory.
onnxruntime can save both results (``session.save_external_prepacked_constant_initializers``):
the first load of a model on a machine writes them here, and every later load reads them back
from a memory-mapped file instead of redoing them. The logits are the same to the bit (tests); a
load takes about 0.45x (float32) to 0.8x (``gguf``) the time without it on SmolLM2 (one-off checks;
``edgelm bench`` reports the load against genai's, README Performance), and the packed weights are
file pages the OS can share and reclaim rather than fresh allocations.

The packed layout depends on the CPU's instruction set, the onnxruntime version and the
optimization level, so the cache lives on the device (``$EDGELM_CACHE/load-cache``), never in the
model folder (``$EDGELM_LOAD_CACHE_DIR`` moves it), and its key holds all three plus the size and modification time of the model's
files: a re-export or an upgrade gets a fresh entry and the stale one of the same model is removed.
It costs disk: the saved file keeps the original weights beside the packed ones (SmolLM2 int8:
330 MB for a 148 MB export). ``EDGELM_LOAD_CACHE=0`` (or ``load_cache=False``) turns it off.
Only plain CPU sessions use it (other providers pack nothing of the CPU's, or compile the graph).

Writing the entry is slower than the load it saves: onnxruntime serializes the optimized graph and
every packed weight (SmolLM2 float32 in the README's ``benchmarks/run.sh`` run: 2.11 s to write, where a
plain load took 0.56 s and genai's load 0.67 s). So by default the first load is a plain one and the entry is written by a detached
process of low priority (``cache_writer``) that the load starts once its own session is ready: the
first load costs what a plain load costs, and the machine pays the write beside it, on one thread at
nice 10, with a second copy of the model in memory while it writes. ``EDGELM_LOAD_CACHE=sync`` (or
``load_cache="sync"``) writes it during the load instead, as deploy scripts and memory-tight devices may prefer.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import onnxruntime as ort

ENV = "EDGELM_LOAD_CACHE"
MODEL_NAME = "model.onnx"
STATUS = "edgelm_load_cache"
"""The attribute of each session this module makes that says how the load went: "hit" (read from the
cache), "written" (loaded and saved to it), "writing" (loaded plainly, a background writer started) or
"failed" (loaded without it, after a warning)."""
SOURCE = "edgelm_load_cache_source"
"""On a session marked "writing": (model, optimization) of the entry its background writer is making."""
STALE_TMP_SECONDS = 3600
"""A temporary entry older than this is taken for one a killed process left behind, and removed."""


MODES = ("off", "background", "sync")
"""How a load uses the cache when it has no entry yet: not at all, a plain load and a background writer, or
writing the entry during the load. With an entry, every mode but "off" reads it."""
_ENV_MODES = {"0": "off", "1": "background", "sync": "sync"}


def mode(requested: bool | str | None) -> str:
    """``requested`` if given (True: "background", False: "off", or a mode's name), else ``$EDGELM_LOAD_CACHE``:
    1 (the default) for a background write, sync, or 0."""
    from edgelm.runtime.errors import ProviderError

    if requested is not None:
        if isinstance(requested, bool):
            return "background" if requested else "off"
        if requested in MODES:
            return requested
        raise ProviderError(f"load_cache={requested!r}: use True, False or one of {', '.join(MODES)}")
    value = os.environ.get(ENV, "1")
    if value not in _ENV_MODES:
        raise ProviderError(f"{ENV}={value!r}: use 1 to cache onnxruntime's prepacked graph (written in the "
                            "background on a first load), sync to write it during that load, 0 to load without it")
    return _ENV_MODES[value]


def enabled(requested: bool | str | None) -> bool:
    """Whether loads use the cache at all (see ``mode``)."""
    return mode(requested) != "off"


DIR_ENV = "EDGELM_LOAD_CACHE_DIR"


def edgelm_cache() -> Path:
    """The root of every edgelm cache: ``$EDGELM_CACHE`` if set, else ``~/.cache/edgelm`` (not created here).

    It lives in the runtime, the lowest layer that needs it; the model recipes' cache builds on it."""
    base = os.environ.get("EDGELM_CACHE")
    return Path(base).expanduser() if base else Path.home() / ".cache" / "edgelm"


def root() -> Path:
    """``$EDGELM_LOAD_CACHE_DIR``, else ``load-cache`` in edgelm's cache."""
    own = os.environ.get(DIR_ENV)
    return Path(own).expanduser() if own else edgelm_cache() / "load-cache"


@functools.lru_cache(maxsize=1)
def _cpu_identity() -> str:
    """What decides the packed layout besides onnxruntime: the architecture and the CPU's feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip().lower()
                if key in ("flags", "features", "model name", "cpu part"):
                    flags += line.strip() + "\n"
                if not line.strip() and flags:  # the first processor's block is enough
                    break
    except OSError:
        flags = platform.processor()
    return f"{platform.machine()}\n{flags}"


def _sources(model: Path) -> list[Path]:
    """The graph and its external data files (names that start with the graph's file name)."""
    return sorted(p for p in model.parent.iterdir() if p.is_file() and p.name.startswith(model.name))


def key(model: Path, optimization: str) -> str:
    parts = [ort.__version__, optimization, _cpu_identity(), str(model.resolve())]
    for p in _sources(model):
        st = p.stat()
        parts.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def entry_path(model: Path, optimization: str) -> Path:
    """Where ``model``'s entry lives for this onnxruntime, CPU and optimization level (it may not exist)."""
    return root() / f"{model.parent.name}-{key(model, optimization)}"


def _sweep(model: Path, keep: Path) -> None:
    """Remove this model's entries under other keys (re-exported, upgraded), entries of models that are gone,
    and what kills left behind: temporary folders, and background writers' locks and failure records (the
    dot-names), once older than STALE_TMP_SECONDS, when every reader takes them for stale too."""
    now = time.time()
    source = str(model.resolve())
    for p in root().iterdir():
        if p == keep:
            continue
        if p.name.startswith("."):
            try:
                if now - p.stat().st_mtime > STALE_TMP_SECONDS:
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
            except OSError:
                pass  # another process swept it first
            continue
        if not p.is_dir():
            continue
        try:
            meta = json.loads((p / "source.json").read_text())
        except (OSError, ValueError):
            continue
        if meta.get("source") == source or not Path(meta.get("source", "")).is_file():
            shutil.rmtree(p, ignore_errors=True)


def will_write(model: Path, optimization: str = "all") -> bool:
    """Whether a CPU load of ``model`` now would write its entry, during the load or beside it (the cache is on,
    the graph exists, no entry yet): a command line can say so."""
    model = Path(model)
    if not enabled(None) or model.suffix != ".onnx" or not model.is_file():
        return False
    return not (entry_path(model, optimization) / MODEL_NAME).is_file()


def session(model: Path, make_options: Callable[[], ort.SessionOptions], optimization: str,
            providers: list[str], how: str = "background",
            entries: dict[str, str] | None = None) -> ort.InferenceSession:
    """A CPU session of ``model``: from the cached prepacked graph when there is one; else a plain session and a
    background writer of the entry (``how`` "background"), or a session that writes it (``how`` "sync").

    ``entries``: the session config entries ``make_options`` adds beyond edgelm's own, which a background
    writer must set too. Any failure to read or write the cache (full disk, read-only home, a damaged
    entry) falls back to a plain session with a warning: the cache may only ever make a load faster.
    """
    entry = entry_path(model, optimization)
    cached = entry / MODEL_NAME
    if cached.is_file():
        opts = make_options()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # saved already optimized
        try:
            return _marked(ort.InferenceSession(str(cached), opts, providers=providers), "hit")
        except Exception as exc:  # a damaged entry: drop it and write it again below
            warnings.warn(f"edgelm: the load cache entry {entry} is unreadable ({exc}); writing it again", RuntimeWarning,
                          stacklevel=4)
            shutil.rmtree(entry, ignore_errors=True)
    if how == "sync":
        return write(model, make_options, optimization, providers, stacklevel=5)
    from edgelm.runtime import cache_writer  # it imports this module

    sess = ort.InferenceSession(str(model), make_options(), providers=providers)  # a bad model raises here
    problem = cache_writer.start(model, optimization, entries or {})
    if problem:
        warnings.warn(f"edgelm: {problem}; loaded {model} without the load cache (set {ENV}=0 to stop trying)",
                      RuntimeWarning, stacklevel=4)
        return _marked(sess, "failed")
    setattr(sess, SOURCE, (model, optimization))
    return _marked(sess, "writing")


def write(model: Path, make_options: Callable[[], ort.SessionOptions], optimization: str, providers: list[str],
          stacklevel: int = 2, fallback: bool = True) -> ort.InferenceSession | None:
    """A session of ``model`` that saves its optimized, prepacked graph as the model's entry on the way (a
    temporary folder renamed into place); marked "written", or "failed" with a warning and no entry.

    ``fallback=False`` (the background writer, which only wants the entry): where onnxruntime could not
    save, None with the warning instead of a plain session loaded for nothing."""

    def without(why: str) -> ort.InferenceSession | None:
        sess = ort.InferenceSession(str(model), make_options(), providers=providers) if fallback else None
        warnings.warn(f"edgelm: {why}; loaded {model} without the load cache (set {ENV}=0 to stop trying)",
                      RuntimeWarning, stacklevel=stacklevel + 1)
        return _marked(sess, "failed") if sess is not None else None

    entry = entry_path(model, optimization)
    started = time.perf_counter()
    try:
        root().mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root()))
    except OSError as exc:
        return without(f"cannot write the load cache in {root()} ({exc})")
    try:
        opts = make_options()
        opts.optimized_model_filepath = str(tmp / MODEL_NAME)
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", MODEL_NAME + ".data")
        opts.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
        sess = ort.InferenceSession(str(model), opts, providers=providers)
    except Exception:  # a full disk while saving, or a model that does not load: a plain load tells them apart
        shutil.rmtree(tmp, ignore_errors=True)
        return without("onnxruntime could not save the prepacked graph in the load cache")
    try:
        if not (tmp / MODEL_NAME).is_file():
            raise OSError("onnxruntime wrote no optimized graph")
        (tmp / "source.json").write_text(json.dumps({
            "source": str(model.resolve()), "onnxruntime": ort.__version__, "optimization": optimization,
            "write_s": round(time.perf_counter() - started, 3)}))
        try:
            tmp.rename(entry)
        except OSError:  # another process wrote the same entry first: keep theirs
            if not (entry / MODEL_NAME).is_file():
                raise
        _sweep(model, entry)
        status = "written"
    except OSError as exc:  # the session is loaded: keep it, only the entry is missing
        warnings.warn(f"edgelm: could not write the load cache entry for {model} ({exc})", RuntimeWarning,
                      stacklevel=stacklevel)
        status = "failed"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _marked(sess, status)


def written_in(model: Path, optimization: str = "all") -> float | None:
    """Seconds the writer of ``model``'s entry took (None: no entry, or one from before this was recorded)."""
    try:
        return json.loads((entry_path(Path(model), optimization) / "source.json").read_text()).get("write_s")
    except (OSError, ValueError):
        return None


def _marked(sess: ort.InferenceSession, status: str) -> ort.InferenceSession:
    setattr(sess, STATUS, status)
    return sess


def status(sess: ort.InferenceSession) -> str:
    """How ``sess`` was loaded: "hit", "written" (during the load), "writing" (a background writer started),
    "failed", or "off" (not through the cache)."""
    return getattr(sess, STATUS, "off")
