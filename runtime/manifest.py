"""``edgelm.json``: everything the runtime needs to know about an exported folder, so it guesses nothing.

The exporter writes it; the runtime reads it. A folder made by ``optimum-cli export onnx``
has no manifest, so one is derived from its ``config.json`` and the graph's inputs and
outputs (such a graph has no ``last_hidden_state``, which only contrastive search needs).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.runtime.errors import ModelLoadError

MANIFEST_NAME = "edgelm.json"
FORMAT_VERSION = 2
"""The newest manifest format this runtime reads; bumped when a change makes older runtimes misread newer
folders. 2: a draft folder (``draft_vocab``), whose logits cover part of the vocabulary. Ordinary exports
still write 1, which every release reads."""
DRAFT_FORMAT_VERSION = 2


@dataclass
class Manifest:
    task: str
    architecture: str
    model_type: str
    model_file: str
    inputs: list[str]
    outputs: list[str]
    vocab_size: int
    num_layers: int = 0
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    head_dim: int = 0
    hidden_size: int = 0
    max_position_embeddings: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    dtype: str = "float32"
    kv_layout: str = "batch,num_key_value_heads,sequence,head_dim"
    sliding_window: int | None = None
    format_version: int = 1
    edgelm_version: str = ""
    source: str = ""
    validation: dict[str, Any] = field(default_factory=dict)
    export_seconds: float | None = None
    variants: dict[str, str] = field(default_factory=dict)
    static_max_length: int | None = None
    """Set for a static-shape export: the fixed KV buffer length (prompt + generated tokens)."""
    static_batch: int | None = None
    attention: str = "onnx"
    """"GroupQueryAttention" when the export fused attention into onnxruntime's contrib operators."""
    draft_vocab: dict[str, Any] | None = None
    """Set by ``edgelm draft``: the graph's logits cover only these tokens, ``{"first": n, "extra": [ids]}``
    (ids below n, then the listed ones), in that order. Such a folder serves as ``assistant_model`` only."""

    @property
    def has_last_hidden_state(self) -> bool:
        return "last_hidden_state" in self.outputs

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def draft_token_ids(manifest: Manifest) -> np.ndarray | None:
    """The token id of each logits column of a draft folder (None for a whole-vocabulary export)."""
    spec = manifest.draft_vocab
    if not spec:
        return None
    return np.concatenate([np.arange(int(spec["first"]), dtype=np.int64),
                           np.asarray(spec.get("extra") or [], np.int64)])


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def read_manifest(model_dir: Path) -> Manifest:
    """The folder's manifest, or one derived from an optimum export; a clear error otherwise."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"{model_dir} is not a folder; give the output folder of `edgelm export`")
    path = model_dir / MANIFEST_NAME
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{path} is not valid JSON ({exc}); re-export the model") from exc
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ModelLoadError(
                f"{model_dir} was exported by a newer edgelm (manifest format {version}, this runtime reads up to "
                f"{FORMAT_VERSION}); upgrade edgelm (pip install -U edgelm)"
            )
        try:
            return Manifest.from_dict(data)
        except TypeError as exc:
            raise ModelLoadError(f"{path} lacks required fields ({exc}); re-export the model") from exc
    if (model_dir / "model.onnx").is_file() and (model_dir / "config.json").is_file():
        return _from_optimum(model_dir)
    raise ModelLoadError(
        f"{model_dir} is not an exported model: it has neither {MANIFEST_NAME} nor model.onnx with config.json; "
        "make one with `edgelm export SOURCE OUTPUT_DIR`"
    )


def _from_optimum(model_dir: Path) -> Manifest:
    import onnxruntime as ort

    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{model_dir / 'config.json'} is not valid JSON ({exc})") from exc
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(str(model_dir / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelLoadError(f"{model_dir / 'model.onnx'} cannot be loaded by onnxruntime: {exc}") from exc
    inputs = [i.name for i in sess.get_inputs()]
    outputs = [o.name for o in sess.get_outputs()]
    task = "causal-lm" if any(n.startswith("past_key_values.") for n in inputs) else "masked-lm"
    man = Manifest(
        task=task,
        architecture=(config.get("architectures") or ["?"])[0],
        model_type=config.get("model_type", "?"),
        model_file="model.onnx",
        inputs=inputs,
        outputs=outputs,
        vocab_size=int(config.get("vocab_size", 0)),
        max_position_embeddings=config.get("max_position_embeddings") or config.get("n_positions"),
        eos_token_id=_as_list(config.get("eos_token_id")),
        pad_token_id=config.get("pad_token_id"),
        bos_token_id=config.get("bos_token_id"),
        source="optimum-cli export onnx",
    )
    if task == "causal-lm":
        past = next(i for i in sess.get_inputs() if i.name == "past_key_values.0.key")
        man.num_layers = sum(1 for n in inputs if n.endswith(".key") and n.startswith("past_key_values."))
        man.num_key_value_heads = int(past.shape[1])
        man.head_dim = int(past.shape[3])
    gen = model_dir / "generation_config.json"
    if gen.is_file() and not man.eos_token_id:
        man.eos_token_id = _as_list(json.loads(gen.read_text()).get("eos_token_id"))
    return man


def resolve_model_file(model_dir: Path, manifest: Manifest, model_file: str | None) -> str:
    """A graph file of this folder: the manifest's, or one it lists among its variants (``model.ort``)."""
    if model_file is None:
        return manifest.model_file
    known = {manifest.model_file, *manifest.variants.values()}
    if Path(model_file).name != model_file:
        raise ModelLoadError(f"model_file is a file name inside {model_dir}, not a path: {model_file!r}")
    if model_file not in known and not (model_dir / model_file).is_file():
        raise ModelLoadError(f"{model_dir} has no {model_file}; it has {', '.join(sorted(known))}"
                             + ("" if manifest.variants else " (export with --mobile to get model.ort)"))
    return model_file
