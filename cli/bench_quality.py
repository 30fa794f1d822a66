"""What quantization costs, beside the anchor's quantized build: perplexity ratio, size, greedy agreement.

Perplexity is computed the same way for every graph, edgelm's and onnxruntime-genai's alike:
onnxruntime straight on the graph file, the built-in text (``edgelm/export/data/quality.txt``,
1,452 SmolLM2 tokens of technical prose) in windows of 511 tokens, each from an empty cache, as the
export measures itself.
So the ratios of both systems are against the same float32 reference on the same tokens.
A second, held-out text checks that what the export tuned on its built-in texts carries over:
the first 2,048 tokens of the Python language reference as CPython ships it for ``help()``
(``pydoc_data.topics``), which neither the calibration nor any choice made here has seen.
Greedy agreement runs both edgelm models through edgelm's runtime.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "The three primary colors are",
    "Once upon a time, in a small village by the sea,",
    "To make a cup of tea, first",
    "The theory of relativity explains",
    "List of prime numbers: 2, 3, 5,",
    "Photosynthesis is the process by which",
)
NEW_TOKENS = 32
WINDOW = 512
HELDOUT_TOKENS = 2048
MODEL_FILES = ("model.onnx", "model.onnx.data")


def folder_mb(model_dir: str | Path) -> float:
    """Size of the graph files a device must ship (model.onnx + its external data)."""
    return sum((Path(model_dir) / f).stat().st_size for f in MODEL_FILES if (Path(model_dir) / f).is_file()) / 1e6


def _cache_shape(model_dir: Path) -> tuple[int, int]:
    """(KV heads, head size) of a graph folder: edgelm's manifest, or onnxruntime-genai's config."""
    manifest = model_dir / "edgelm.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        return int(m["num_key_value_heads"]), int(m["head_dim"])
    decoder = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
    return int(decoder["num_key_value_heads"]), int(decoder["head_size"])


def _max_positions(model_dir: Path) -> int:
    """The model's position limit (windows must fit it, as the export's own measurement does), if it says."""
    for name, key in (("config.json", "max_position_embeddings"), ("genai_config.json", "context_length")):
        path = model_dir / name
        if path.is_file():
            config = json.loads(path.read_text())
            value = config.get(key) or config.get("model", {}).get(key)
            if value:
                return int(value)
    return WINDOW


def _window_logits(model_dir: str | Path, token_ids: list[int], threads: int | None = None):
    """(logits of each position but the last, the next tokens) of each window of 511 tokens (fewer when the
    model has fewer positions) under the causal graph in ``model_dir``, one window at a time from an empty cache."""
    import onnxruntime as ort

    model_dir = Path(model_dir)
    heads, dim = _cache_shape(model_dir)
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(model_dir / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    names = {i.name: i for i in session.get_inputs()}
    window = min(WINDOW, _max_positions(model_dir)) - 1  # as the export measures itself (export/quality.py)
    for start in range(0, len(token_ids) - 1, window):
        ids = np.asarray([token_ids[start:start + window]], np.int64)
        if ids.shape[1] < 2:
            break
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if "position_ids" in names:
            feeds["position_ids"] = np.arange(ids.shape[1], dtype=np.int64)[None]
        for name in names:
            if name.startswith("past_key_values."):
                feeds[name] = np.zeros((1, heads, 0, dim), np.float32)
        yield session.run(["logits"], feeds)[0][0, :-1], ids[0, 1:]


def graph_perplexity(model_dir: str | Path, token_ids: list[int], threads: int | None = None) -> float:
    """exp(mean NLL) of ``token_ids`` under the causal graph in ``model_dir``."""
    return graph_scores(model_dir, {}, token_ids, threads)["perplexity"]


def graph_scores(reference_dir: str | Path, model_dirs: dict[str, str | Path], token_ids: list[int],
                 threads: int | None = None) -> dict[str, Any]:
    """The reference graph's perplexity of ``token_ids``, and each of ``model_dirs``' perplexity and mean KL
    divergence, per token, of its next-token distributions from the reference's (nats): one pass over the text,
    every graph in step, so the reference's logits are computed once for all.

    Why the divergence beside the perplexity ratio: the ratio scores only the text's own next token, so a
    quantized graph's changes elsewhere in the distribution partly cancel, and on 1,452 tokens it moves by a few
    tenths of a percent between exports that differ little (``benchmarks/smooth_sweep.py`` on SmolLM2: 1.0025 to
    1.0064 across the int8 alphas, in no order, while the divergence halved and then held). The divergence
    compares whole distributions, token by token, as llama.cpp's perplexity tool does with ``--kl-divergence``."""
    from edgelm.export.quality import nll_rows, score_rows

    names = list(model_dirs)
    passes = [_window_logits(reference_dir, token_ids, threads)]
    passes += [_window_logits(model_dirs[name], token_ids, threads) for name in names]
    ref_nll: list[np.ndarray] = []
    nll: dict[str, list[np.ndarray]] = {name: [] for name in names}
    kl: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for (reference, targets), *others in zip(*passes):
        rows = [score_rows(logits, reference, targets) for logits, _ in others]
        ref_nll.append(rows[0][1] if rows else nll_rows(reference, targets))
        for name, (row_nll, _, row_kl) in zip(names, rows):
            nll[name].append(row_nll)
            kl[name].append(row_kl)
    out: dict[str, Any] = {"perplexity": float(np.exp(np.concatenate(ref_nll).mean()))}
    for name in names:
        out[name] = {"perplexity": float(np.exp(np.concatenate(nll[name]).mean())),
                     "kl_divergence": float(np.concatenate(kl[name]).mean())}
    return out


def text_ids(model_dir: str | Path) -> list[int]:
    from edgelm.export.quant.calibrate import builtin_text
    from edgelm.runtime.tokenizer import Tokenizer

    return [int(i) for i in Tokenizer.load(Path(model_dir)).encode(builtin_text("quality.txt"))]


def heldout_ids(model_dir: str | Path) -> list[int]:
    """The held-out text's first HELDOUT_TOKENS tokens (the Python reference's help topics, in name order)."""
    from pydoc_data.topics import topics

    from edgelm.runtime.tokenizer import Tokenizer

    text = "\n\n".join(topics[name] for name in sorted(topics))[: 12 * HELDOUT_TOKENS]
    return [int(i) for i in Tokenizer.load(Path(model_dir)).encode(text)][:HELDOUT_TOKENS]


def quality(model_dir: str, reference_dir: str, threads: int | None = None,
            anchors: dict[str, str] | None = None) -> dict[str, Any]:
    """Greedy agreement, perplexity ratio and KL divergence of ``model_dir`` against the float32
    ``reference_dir`` on the built-in and held-out texts; ``anchors`` (system -> folder, e.g. genai's int4 build)
    get the same figures but greedy agreement, and size. Each text is one pass, every graph in step."""
    from edgelm.runtime import CausalLM

    lm, ref = CausalLM.load(model_dir, threads=threads), CausalLM.load(reference_dir, threads=threads)
    same, prefix, agree = 0, [], []
    for prompt in PROMPTS:
        ids = np.asarray([lm.tokenizer.encode(prompt)], np.int64)
        kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        a = lm.generate(ids, **kw)[0, ids.shape[1]:]
        b = ref.generate(ids, **kw)[0, ids.shape[1]:]
        equal = a == b
        same += bool(equal.all())
        prefix.append(int(np.argmin(equal)) if not equal.all() else NEW_TOKENS)
        agree.append(float(equal.mean()))
    texts = {"": text_ids(reference_dir), "heldout_": heldout_ids(reference_dir)}
    graphs = {"edgelm": model_dir, **{f"anchor:{system}": folder for system, folder in (anchors or {}).items()}}
    scores = {tag: graph_scores(reference_dir, graphs, ids, threads) for tag, ids in texts.items()}

    def measured(graph: str) -> dict[str, float]:
        row = {"perplexity": scores[""][graph]["perplexity"]}
        for tag, score in scores.items():
            row[f"{tag}perplexity_ratio"] = score[graph]["perplexity"] / score["perplexity"]
            row[f"{tag}kl_divergence"] = score[graph]["kl_divergence"]
        return row

    out = {
        "reference": str(reference_dir), "prompts": len(PROMPTS), "new_tokens": NEW_TOKENS,
        "identical_continuations": same, "mean_common_prefix": float(np.mean(prefix)),
        "token_agreement": float(np.mean(agree)), "text_tokens": len(texts[""]),
        "reference_perplexity": scores[""]["perplexity"], "heldout_tokens": len(texts["heldout_"]),
        **measured("edgelm"), "size_mb": folder_mb(model_dir), "reference_size_mb": folder_mb(reference_dir),
        "anchors": {system: {**measured(f"anchor:{system}"), "size_mb": folder_mb(folder)}
                    for system, folder in (anchors or {}).items()},
    }
    return out


def quality_markdown(q: dict[str, Any], precision: str) -> str:
    lines = [
        f"Quality against {Path(q['reference']).name} (perplexity on the built-in text, {q['text_tokens']} tokens in "
        f"windows of {WINDOW - 1}, onnxruntime on each graph; held-out: {q.get('heldout_tokens', 0)} tokens of the Python "
        f"language reference; greedy: {q['prompts']} prompts x {q['new_tokens']} tokens):",
        "",
        "| system | scheme | size MB | perplexity | ratio to float32 | ratio on held-out text | KL divergence from "
        "float32, built-in / held-out | identical greedy continuations | token agreement |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| edgelm | {precision} | {q['size_mb']:.0f} | {q['perplexity']:.3f} | {q['perplexity_ratio']:.4f} | "
        f"{_held(q)} | {_kld(q)} | {q['identical_continuations']}/{q['prompts']} | {q['token_agreement']:.0%} |",
    ]
    for system, a in q.get("anchors", {}).items():
        lines.append(f"| {system} | its own build | {a['size_mb']:.0f} | {a['perplexity']:.3f} | "
                     f"{a['perplexity_ratio']:.4f} | {_held(a)} | {_kld(a)} | - | - |")
    lines.append(f"| float32 reference | - | {q['reference_size_mb']:.0f} | {q['reference_perplexity']:.3f} | 1.0000 "
                 "| 1.0000 | 0 / 0 | - | - |")
    return "\n".join(lines)


def _kld(entry: dict[str, Any]) -> str:
    if entry.get("kl_divergence") is None:
        return "-"
    return f"{entry['kl_divergence']:.4f} / {entry['heldout_kl_divergence']:.4f}"


def _held(entry: dict[str, Any]) -> str:
    ratio = entry.get("heldout_perplexity_ratio")
    return "-" if ratio is None else f"{ratio:.4f}"
