"""Reading what the user points the exporter at: a transformers checkpoint folder or a GGUF file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelm.runtime.errors import ExportError

CAUSAL_TYPES = {
    "gpt2": "GPT-2", "llama": "Llama / SmolLM2", "qwen2": "Qwen2", "mistral": "Mistral",
    "phi3": "Phi-3", "gemma3_text": "Gemma 3 (text)",
}
MASKED_TYPES = {"bert": "BERT", "distilbert": "DistilBERT", "roberta": "RoBERTa"}
TASKS = ("causal-lm", "masked-lm")


def supported_text() -> str:
    return ("causal LMs: " + ", ".join(CAUSAL_TYPES.values()) + "; masked LMs: " + ", ".join(MASKED_TYPES.values()))


@dataclass
class Source:
    """A loaded model, its tokenizer and where they came from."""

    path: Path
    gguf_file: str | None
    task: str
    model: Any
    tokenizer: Any
    config: Any
    tokenizer_report: dict | None = None


def _check_path(path: Path) -> tuple[Path, str | None]:
    if not path.exists():
        raise ExportError(f"source {path} does not exist; give a transformers checkpoint folder or a .gguf file")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ExportError(f"source {path} is a file but not a .gguf; give a checkpoint folder or a .gguf file")
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ExportError(f"{path} is not a valid GGUF file (bad magic {magic!r}); the file is corrupt or truncated")
        return path.parent, path.name
    if not (path / "config.json").is_file():
        raise ExportError(f"{path} has no config.json: it is not a transformers checkpoint folder")
    return path, None


def detect_task(config: Any) -> str:
    """Causal or masked, from the architectures the checkpoint was saved with, else its model type."""
    for arch in getattr(config, "architectures", None) or []:
        if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
            return "causal-lm"
        if arch.endswith("ForMaskedLM"):
            return "masked-lm"
    if config.model_type in CAUSAL_TYPES:
        return "causal-lm"
    if config.model_type in MASKED_TYPES:
        return "masked-lm"
    raise ExportError(f"cannot tell the task of model type {config.model_type!r}; pass --task causal-lm or masked-lm")


def load_source(source: str | Path, task: str | None = None, tokenizer_options: dict[str, Any] | None = None,
                log: Any = print) -> Source:
    """Load model and tokenizer in float32 with eager attention (the exporter traces it).

    The tokenizer is checked first (``tokenizer_check``): a vocabulary the tokenizer cannot produce
    stops the export before the model is even loaded.
    """
    from edgelm.export import tokenizer_check
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    path, gguf = _check_path(Path(source))
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except Exception as exc:  # transformers raises many kinds; all mean "not loadable"
        what = "GGUF file" if gguf else "config.json"
        raise ExportError(f"cannot read the {what} of {source}: {str(exc).splitlines()[0]}") from exc
    if task is not None and task not in TASKS:
        raise ExportError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    task = task or detect_task(config)
    table = CAUSAL_TYPES if task == "causal-lm" else MASKED_TYPES
    if config.model_type not in table:
        raise ExportError(f"model type {config.model_type!r} is not supported for {task}; supported: {supported_text()}")
    options = dict(tokenizer_options or {})

    def load_tokenizer(opts: dict[str, Any]) -> Any:
        try:
            tok = AutoTokenizer.from_pretrained(path, **kwargs, **opts)
        except Exception as exc:
            raise ExportError(f"cannot load the tokenizer of {source}: {str(exc).splitlines()[0]}") from exc
        if not getattr(tok, "is_fast", False):
            raise ExportError(f"the tokenizer of {source} has no fast (tokenizer.json) form, which the runtime needs")
        if gguf and task == "causal-lm" and config.eos_token_id is not None \
                and tok.eos_token_id != _first(config.eos_token_id):
            # The GGUF reader can pick a different EOS for the tokenizer than the model's config.
            tok.eos_token = tok.convert_ids_to_tokens(_first(config.eos_token_id))
        return tok

    tokenizer, report = tokenizer_check.check(load_tokenizer(options), options, load_tokenizer, log)
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForMaskedLM
    try:
        model = auto.from_pretrained(path, torch_dtype="float32", attn_implementation="eager", **kwargs).eval()
    except Exception as exc:
        raise ExportError(f"cannot load the weights of {source}: {str(exc).splitlines()[0]}") from exc
    return Source(path=path, gguf_file=gguf, task=task, model=model, tokenizer=tokenizer, config=model.config,
                  tokenizer_report=report)


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) else value
