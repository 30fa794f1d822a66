"""Where fetched and built models live, and how they get there without half-written folders."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def cache_dir() -> Path:
    """The root of edgelm's cache (``runtime.load_cache.edgelm_cache``), created if missing."""
    from edgelm.runtime.load_cache import edgelm_cache

    path = edgelm_cache()
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_dir(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``final`` that becomes ``final`` only if the block succeeds.

    The temporary folder sits in the same parent so the closing rename is atomic on one
    filesystem; a crash, a full disk or Ctrl-C leaves either the old state or the new one,
    never a half-written ``final``. Leftover ``.tmp-`` folders of killed runs are harmless
    and are swept the next time the same target is written.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".tmp-{final.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any folder the user makes
    try:
        yield tmp
        if final.exists():
            if not overwrite:
                raise FileExistsError(f"{final} already exists")
            old = final.with_name(f".tmp-{final.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
