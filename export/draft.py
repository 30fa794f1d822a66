"""A draft model whose LM head keeps only the tokens a draft is likely to propose (``edgelm draft``).

In assisted decoding the draft runs once per drafted token, and with a large vocabulary its LM
head is a large share of that work: Qwen2.5-Coder-0.5B's head is 136M of its 494M weights
(151,936 tokens). A draft only proposes; the target checks every token, so a draft that cannot
propose a rare token costs one rejection when the target wants that token, never a wrong output.
Cutting the head to the frequent tokens makes every draft step cheaper (measured in the README).

Which tokens: byte-level BPE and SentencePiece vocabularies number their tokens by merge order or
score, so low ids are the frequent ones (FR-Spec ranks by corpus counts instead; the tokenizer's
own order needs no corpus). The first ``keep`` ids stay, plus every special or added token and the
end-of-sequence ids, so the draft can still propose the end of a turn.

The cut is a graph edit on an existing export: the rows of the head's weights (and of its scales
and zero points when quantized) are taken at the kept ids. The result is checked against the
source graph: its logits must equal the source's logits at the kept ids.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgelm.export import greedy_head, onnx_files
from edgelm.export.graph import prune_unused
from edgelm.export.quant.rewrite import MS, node_attr
from edgelm.models.cache import atomic_dir
from edgelm.runtime.errors import ExportError
from edgelm.runtime.manifest import DRAFT_FORMAT_VERSION, MANIFEST_NAME, Manifest, draft_token_ids, read_manifest

LOGITS = "logits"
CHECK_RTOL = 1e-5
"""The cut head computes the same rows as the source's; a float32 GEMM may block a narrower matrix
differently, so equality is asked to float32 rounding rather than to the bit."""


def special_ids_above(model_dir: Path, manifest: Manifest, keep: int) -> list[int]:
    """Added/special tokens and the end, pad and start ids at or above ``keep``: kept beside the first ``keep``."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    special = set(tok.get_added_tokens_decoder()) | set(manifest.eos_token_id)
    special |= {i for i in (manifest.pad_token_id, manifest.bos_token_id) if i is not None}
    return sorted(int(i) for i in special if keep <= int(i) < manifest.vocab_size)


def _constant(model: onnx.ModelProto, name: str, inits: dict[str, onnx.TensorProto]) -> np.ndarray:
    """The value of a constant input: an initializer, or nodes computing one from initializers (a Cast of
    fp16 scales, factored GGUF scales), evaluated with onnxruntime as the session would fold them."""
    if name in inits:
        return onnx_files.array(inits[name])
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    needed, stack = set(), [name]
    while stack:
        cur = stack.pop()
        if cur in needed or cur in inits or cur == "":
            continue
        if cur not in producers:
            raise ExportError(f"the LM head's input {name} depends on the graph input {cur}: it is not a constant weight")
        needed.add(cur)
        stack.extend(producers[cur].input)
    import onnxruntime as ort

    nodes = [n for n in graph.node if any(o in needed for o in n.output)]
    used = {i for n in nodes for i in n.input}
    consts = [numpy_helper.from_array(onnx_files.array(inits[i]), i) for i in used if i in inits]
    probe = helper.make_model(helper.make_graph(nodes, "constant", [], [], consts), opset_imports=list(model.opset_import))
    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(probe).graph.value_info}
    if name not in inferred:
        raise ExportError(f"cannot tell the type of the LM head's input {name}")
    folded = helper.make_model(helper.make_graph(nodes, "constant", [], [inferred[name]], consts),
                               opset_imports=list(model.opset_import))
    sess = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {})[0]


def _rows(a: np.ndarray, n: int, ids: np.ndarray) -> np.ndarray:
    """Rows ``ids`` of an (n, ...) array, or of a flat array holding n equal rows, keeping its rank."""
    if a.ndim >= 2 and a.shape[0] == n:
        return np.ascontiguousarray(a[ids])
    if a.ndim == 1 and a.size % n == 0:
        return np.ascontiguousarray(a.reshape(n, -1)[ids].reshape(-1))
    raise ExportError(f"a weight of the LM head has shape {a.shape}, not rows of {n} tokens")


def cut_head(model: onnx.ModelProto, ids: np.ndarray, vocab: int) -> str:
    """Cut the node producing ``logits`` to the rows ``ids`` in place; returns a line for the log."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    head = next((n for n in graph.node if LOGITS in n.output), None)
    if head is None:
        raise ExportError("the graph has no logits output")
    new_inputs = list(head.input)

    def replace(index: int, array: np.ndarray, what: str) -> None:
        name = f"draft_head_{what}"
        graph.initializer.append(numpy_helper.from_array(array, name))
        new_inputs[index] = name

    if head.op_type == "MatMulNBits" and head.domain == MS:
        if node_attr(head, "N", 0) != vocab:
            raise ExportError(f"the LM head has {node_attr(head, 'N', 0)} outputs, not the vocabulary's {vocab}")
        for index, what in ((1, "B"), (2, "scales"), (3, "zero_points"), (5, "bias")):
            if index < len(head.input) and head.input[index]:
                replace(index, _rows(_constant(model, head.input[index], inits), vocab, ids), what)
        for a in head.attribute:
            if a.name == "N":
                a.i = len(ids)
        kind = f"MatMulNBits, {node_attr(head, 'bits', 0)}-bit"
    elif (head.op_type == "MatMul" and head.domain in ("", "ai.onnx")) or (
            head.op_type == "FusedMatMul" and head.domain == MS and not node_attr(head, "transA", 0)
            and not node_attr(head, "transBatchA", 0) and not node_attr(head, "transBatchB", 0)):
        w = _constant(model, head.input[1], inits)
        if w.ndim != 2:
            raise ExportError(f"the LM head's weight has shape {w.shape}; a 2-D matrix was expected")
        rows_are_tokens = bool(node_attr(head, "transB", 0))
        if (w.shape[0] if rows_are_tokens else w.shape[1]) != vocab:
            raise ExportError(f"the LM head's weight {w.shape} has no side of the vocabulary's {vocab}")
        replace(1, np.ascontiguousarray(w[ids] if rows_are_tokens else w[:, ids]), "weight")
        kind = f"{head.op_type}, float"
    else:
        raise ExportError(f"the LM head ends in a {head.op_type} node, which `edgelm draft` cannot cut; it cuts "
                          "MatMulNBits and MatMul heads (exports with --quantize int4, int8 or none, and GGUF "
                          "heads without offsets such as Q8_0 and Q6_K)")
    del head.input[:]
    head.input.extend(new_inputs)
    for out in graph.output:
        if out.name == LOGITS:
            dims = out.type.tensor_type.shape.dim
            if len(dims):
                dims[len(dims) - 1].ClearField("dim_param")
                dims[len(dims) - 1].dim_value = len(ids)
    prune_unused(graph)
    return kind


def make_draft(source: str | Path, output_dir: str | Path, keep: int, overwrite: bool = False,
               log: Callable[[str], None] = print) -> Manifest:
    """Write ``output_dir``: the export at ``source`` with its LM head cut to ``keep`` tokens (+ special ones)."""
    source, output_dir = Path(source), Path(output_dir)
    manifest = read_manifest(source)
    if manifest.task != "causal-lm":
        raise ExportError(f"{source} holds a {manifest.task} model; drafts are causal LMs")
    if manifest.static_max_length:
        raise ExportError(f"{source} is a static-shape export; cut the dynamic export of the same model instead")
    if manifest.draft_vocab:
        raise ExportError(f"{source} is already a draft ({len(draft_token_ids(manifest))} tokens); cut the full export")
    vocab = manifest.vocab_size
    if not 0 < keep < vocab:
        raise ExportError(f"--keep {keep}: give a number of tokens between 1 and {vocab - 1} (the vocabulary has {vocab})")
    if output_dir.resolve() == source.resolve():
        raise ExportError("the draft needs its own folder: OUTPUT_DIR is SOURCE")
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} already exists; pass --overwrite to replace it")
    extra = special_ids_above(source, manifest, keep)
    draft = dataclasses.replace(manifest, draft_vocab={"first": keep, "extra": extra}, format_version=DRAFT_FORMAT_VERSION,
                                variants={})  # an .ort file of the source still has the whole head
    ids = draft_token_ids(draft)
    log(f"[1/3] cutting the LM head of {source} to {len(ids)} of {vocab} tokens "
        f"(ids below {keep} and {len(extra)} special ones)")
    model = onnx_files.load_graph(source / manifest.model_file)
    kind = cut_head(model, ids, vocab)
    validation = dict(manifest.validation)
    if greedy_head.remove_greedy_head(model):  # its candidates index the whole vocabulary
        names = (greedy_head.INPUT, greedy_head.IDS, greedy_head.LOGITS)
        draft = dataclasses.replace(draft, inputs=[n for n in draft.inputs if n not in names],
                                    outputs=[n for n in draft.outputs if n not in names])
        validation.pop("greedy_head", None)
    with atomic_dir(output_dir, overwrite=overwrite) as tmp:
        for item in source.iterdir():
            if item.is_file() and item.name not in (manifest.model_file, onnx_files.EXTERNAL_DATA, MANIFEST_NAME) \
                    and item.suffix != ".ort" and not item.name.startswith("."):
                shutil.copy2(item, tmp / item.name)
        onnx_files.save(model, tmp / manifest.model_file)
        log(f"[2/3] checking the cut head ({kind}) against the source's logits")
        worst = check_against_source(source, manifest, tmp, draft, ids)
        draft.validation = {**validation, "draft_head": {"kept": len(ids), "of": vocab,
                                                          "max_rel_diff_vs_source": worst}}
        (tmp / MANIFEST_NAME).write_text(draft.to_json())
        log(f"[3/3] wrote {output_dir} (logits equal the source's at the kept ids: max relative difference {worst:.1e})")
    return draft


def check_against_source(source: Path, manifest: Manifest, folder: Path, draft: Manifest, ids: np.ndarray) -> float:
    """Prefill a short prompt in both graphs; the draft's logits must be the source's columns ``ids``."""
    import onnxruntime as ort

    def run(path: Path) -> np.ndarray:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        n = 7
        feeds = {}
        for inp in sess.get_inputs():
            if inp.name == "input_ids":
                feeds[inp.name] = (np.arange(n, dtype=np.int64) * 37 % draft.vocab_size)[None]
            elif inp.name == "attention_mask":
                feeds[inp.name] = np.ones((1, n), np.int64)
            elif inp.name == "position_ids":
                feeds[inp.name] = np.arange(n, dtype=np.int64)[None]
            elif inp.name.startswith("past_key_values."):
                dtype = np.float16 if "float16" in inp.type else np.float32
                feeds[inp.name] = np.zeros((1, draft.num_key_value_heads, 0, draft.head_dim), dtype)
            else:
                raise ExportError(f"cannot check a graph with the input {inp.name}")
        out = sess.run([LOGITS], feeds)[0]
        return out.astype(np.float32)

    ref = run(source / manifest.model_file)[..., ids]
    got = run(folder / draft.model_file)
    scale = max(float(np.abs(ref).max()), 1e-30)
    worst = float(np.abs(got - ref).max()) / scale
    if got.shape != ref.shape or worst > CHECK_RTOL:
        raise ExportError(f"the cut head's logits differ from the source's at the kept tokens (relative {worst:.1e}, "
                          f"shapes {got.shape} vs {ref.shape}); nothing was written (please report this)")
    return worst
