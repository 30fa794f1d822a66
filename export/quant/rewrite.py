"""Rewrite a float graph's weight matrices into onnxruntime's block-quantized operators.

A scheme decides *what* each matrix becomes (a list of ``BlockQuant`` parts, or nothing to
keep it float); this module decides *how* the graph computes with it:

- ``MatMul(x, W)`` / the LM head ``FusedMatMul(x, table, transB=1)`` -> ``MatMulNBits``, one
  node per kind of part (a fused q/k/v projection whose parts came from GGUF tensors of
  different formats gets one node per format, joined by a Concat);
- per-block offsets (affine GGUF formats) -> ``MatMul(MatMul(x, J), offsets)`` added to the
  output, where ``J`` (K, K/block) sums each block of the activations: the exact form of
  sum_k x_k (s_b q_k + o_b) = sum_k x_k s_b q_k + sum_b o_b (sum_{k in b} x_k). The block
  sums of one activation are computed once for all the matrices that read it;
- the embedding ``Gather`` -> ``GatherBlockQuantized``; a tied embedding/LM head keeps one
  quantized table that both operators read, so the float32 table never comes back.

MatMulNBits runs with ``accuracy_level`` 4 (activations quantized to int8 per block inside the
kernel, llama.cpp's Q8 activations): 4-5x faster on CPUs than float compute, and its cost in
quality is part of what each export measures (``export.quality``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgelm.export import onnx_files
from edgelm.export.quant.blocks import BlockQuant, Factored, common_form, concat_rows

MS = "com.microsoft"
ACCURACY_LEVEL = 4


class Scheme(Protocol):
    name: str

    def matrix(self, w: np.ndarray, role: str, name: str) -> list[BlockQuant] | None:
        """``w`` (N outputs, K inputs) float32 -> parts stacked along N, or None to keep it float.

        ``role`` is "linear", "head" (N = vocabulary) or "embedding" (a Gather's table, maybe tied).
        """


@dataclass
class Report:
    """What the rewrite did, for the manifest and the export's log."""

    quantized: dict[str, int] = field(default_factory=dict)
    """Weights per source kind ("Q4_1", "int4 (searched)", ...)."""
    kept_float: list[str] = field(default_factory=list)
    weight_bytes: int = 0
    nodes: dict[str, int] = field(default_factory=dict)

    def count(self, part: BlockQuant) -> None:
        self.quantized[part.source] = self.quantized.get(part.source, 0) + part.q.size


def node_attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _plain_fused_matmul(node: onnx.NodeProto) -> bool:
    """A FusedMatMul that is just x @ B or x @ B.T (what the tied LM head is)."""
    return (node.op_type == "FusedMatMul" and node.domain == MS and node_attr(node, "transA", 0) == 0
            and node_attr(node, "alpha", 1.0) == 1.0 and not node_attr(node, "transBatchA", 0)
            and not node_attr(node, "transBatchB", 0))


PROGRESS_EVERY = 15.0
"""Seconds between progress lines while quantizing."""


class _Builder:
    def __init__(self, model: onnx.ModelProto, scheme: Scheme, vocab_size: int | None, log: Callable[[str], None],
                 accuracy_level: int):
        self.accuracy_level = accuracy_level
        self.model = model
        self.graph = model.graph
        self.scheme = scheme
        self.vocab_size = vocab_size
        self.log = log
        self.inits = {t.name: t for t in self.graph.initializer}
        self.new_inits: list[onnx.TensorProto] = []
        self.block_sums: dict[tuple[str, int], str] = {}
        self.indicators: dict[tuple[int, int], str] = {}
        self.quantized: dict[str, list[BlockQuant] | None] = {}
        self.shared_data: dict[str, tuple[str, str]] = {}
        self.report = Report()
        self.counter = 0
        matrices = [t for t in self.graph.initializer if len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT]
        self.progress = {"total": sum(int(np.prod(t.dims)) for t in matrices), "done": 0,
                         "matrices": len(matrices), "seen": 0, "logged": time.monotonic()}
        """Weights handled so far, for a progress line every PROGRESS_EVERY seconds (a 1.5B model takes minutes)."""

    # --- names and initializers -------------------------------------------------------------
    def _name(self, base: str) -> str:
        self.counter += 1
        return f"{base}_q{self.counter}"

    def _init(self, array: np.ndarray, base: str) -> str:
        name = self._name(base)
        array = np.asarray(array)  # 0-d stays 0-d (Range takes only true scalars); ascontiguousarray would make it 1-d
        self.new_inits.append(numpy_helper.from_array(array if array.ndim == 0 else np.ascontiguousarray(array), name))
        return name

    def _float(self, array: np.ndarray, base: str, nodes: list[onnx.NodeProto]) -> str:
        """A float32 constant, stored as float16 when every value survives the trip (GGUF scales are fp16).

        onnxruntime folds the Cast when the session loads, so the operators read float32 initializers
        (MatMulNBits prepacks them as before) while the file holds half the bytes.
        """
        array = np.ascontiguousarray(array, dtype=np.float32)
        half = array.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), array, equal_nan=True):
            return self._init(array, base)
        out = self._name(f"{base}_f32")
        nodes.append(helper.make_node("Cast", [self._init(half, f"{base}_f16")], [out], name=self._name(f"{base}_Cast"),
                                      to=onnx.TensorProto.FLOAT))
        return out

    def _node(self, op: str, inputs: list[str], base: str, nodes: list[onnx.NodeProto], **attrs) -> str:
        out = self._name(f"{base}_{op}")
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def _factored(self, f: Factored, scales: str | None, base: str, nodes: list[onnx.NodeProto]) -> str:
        """Constant nodes that rebuild ``f.values(scales)`` in float32 when the session loads (folded there)."""
        n, outer_blocks = f.outer.shape
        outer = self._node("Cast", [self._init(f.outer.astype(np.float16), f"{base}_outer")], base, nodes,
                           to=onnx.TensorProto.FLOAT)
        if f.inner is None:
            term = outer
        else:
            outer3 = self._node("Reshape", [outer, self._const_shape([n, outer_blocks, 1], f"{base}_o3")], base, nodes)
            inner = self._node("Cast", [self._init(f.inner, f"{base}_inner")], base, nodes, to=onnx.TensorProto.FLOAT)
            inner3 = self._node("Reshape", [inner, self._const_shape([n, outer_blocks, f.per], f"{base}_i3")], base,
                                nodes)
            term = self._node("Reshape", [self._node("Mul", [outer3, inner3], base, nodes),
                                          self._const_shape([n, outer_blocks * f.per], f"{base}_2d")], base, nodes)
        if not f.coef:
            return term if f.sign > 0 else self._node("Neg", [term], base, nodes)
        scaled = self._node("Mul", [scales, self._init(np.asarray(f.coef, np.float32), f"{base}_coef")], base, nodes)
        return self._node("Add" if f.sign > 0 else "Sub", [scaled, term], base, nodes)

    def _scales(self, part: BlockQuant, base: str, nodes: list[onnx.NodeProto]) -> str:
        f = part.scale_factors
        if f is not None and np.array_equal(f.values(), part.scales) and _half_exact(f.outer):
            return self._factored(f, None, f"{base}_scales", nodes)
        return self._float(part.scales, f"{base}_scales", nodes)

    def _offsets(self, part: BlockQuant, scales: str, base: str, nodes: list[onnx.NodeProto],
                 transposed: bool = False) -> str:
        """The (N, blocks) offsets, or (blocks, N) as the offsets MatMul reads them (``transposed``); ``scales`` is
        the node output of the same part's scales (K-quants use them).

        The rule is by format. Per-block offsets (Q4_1, Q5_1: one float per block) are stored as the
        operators read them, already summed: onnxruntime folds every constant node when a session loads,
        and the Mul, Add and Transpose that rebuilt them cost about 50 ms of SmolLM2's 0.4 s session. In
        float16 (one Cast left to fold) they take the bytes their factored form took; the few that float16
        cannot hold exactly stay float32. A K-quant's offsets (an fp16 per super-block times 6-bit mins)
        stay factored: that is a third of the bytes, and the folder's size is bounded by the GGUF's.
        """
        f = part.offset_factors
        if f is not None and f.inner is not None and np.array_equal(f.values(part.scales), part.offsets) \
                and _half_exact(f.outer):
            out = self._factored(f, scales, f"{base}_offsets", nodes)
            return self._node("Transpose", [out], base, nodes) if transposed else out
        return self._float(part.offsets.T if transposed else part.offsets, f"{base}_offsets", nodes)

    def _const_shape(self, values: list[int], base: str) -> str:
        return self._init(np.asarray(values, np.int64), base)

    def table_data(self, init_name: str, table: BlockQuant, nodes: list[onnx.NodeProto]) -> tuple[str, str]:
        """Packed codes and (N, blocks) scales of a table, one copy for every operator that reads it (tied
        embedding/head); the first reader's ``nodes`` get the scales' Cast."""
        if init_name not in self.shared_data:
            base = _base(init_name)
            self.shared_data[init_name] = (self._init(table.packed(), f"{base}_table"),
                                           self._scales(table, f"{base}_table", nodes))
        return self.shared_data[init_name]

    # --- what each weight becomes --------------------------------------------------------------
    def parts(self, init_name: str, rows_are_outputs: bool, role: str) -> list[BlockQuant] | None:
        """The scheme's parts for a weight initializer (once per initializer, however many nodes read it).

        ``rows_are_outputs``: the initializer is (N, K) already (a Gather's table, a transB head);
        a MatMul's B is (K, N).
        """
        if init_name not in self.quantized:
            self._progress()
            array = onnx_files.array(self.inits[init_name])
            w = array if rows_are_outputs else array.T
            if array.ndim != 2 or array.dtype != np.float32:
                self.quantized[init_name] = None
            else:
                parts = self.scheme.matrix(np.ascontiguousarray(w), role, init_name)
                self.quantized[init_name] = parts
                if parts is None:
                    self.report.kept_float.append(f"{init_name} {tuple(w.shape)}")
                else:
                    for part in parts:
                        self.report.count(part)
            self.progress["done"] += array.size
            self.progress["seen"] += 1
        return self.quantized[init_name]

    def _progress(self) -> None:
        p = self.progress
        now = time.monotonic()
        if now - p["logged"] >= PROGRESS_EVERY and p["total"]:
            p["logged"] = now
            self.log(f"      quantized {p['seen']}/{p['matrices']} matrices, {p['done'] / p['total']:.0%} of the weights")

    # --- node builders -------------------------------------------------------------------------
    def _block_sum(self, x: str, k: int, block: int, nodes: list[onnx.NodeProto]) -> str:
        """Per-block sums of activation ``x`` (..., K) -> (..., K / block), once per (x, block)."""
        key = (x, block)
        if key not in self.block_sums:
            ind = (k, block)
            if ind not in self.indicators:
                self.indicators[ind] = self._indicator(k, block, nodes)
            out = self._name(f"{x}_block_sums")
            nodes.append(helper.make_node("MatMul", [x, self.indicators[ind]], [out], name=self._name("BlockSum")))
            self.block_sums[key] = out
        return self.block_sums[key]

    def _indicator(self, k: int, block: int, nodes: list[onnx.NodeProto]) -> str:
        """J (K, K / block) float32, J[i, b] = 1 where i // block == b, built by nodes onnxruntime folds at load:
        stored, it would take K * K / block halves (1.5 MB for Qwen2.5-0.5B's down projections)."""
        base = f"block_sum_{k}_{block}"
        rows = self._node("Range", [self._init(np.int64(0), f"{base}_zero"), self._init(np.int64(k), f"{base}_k"),
                                    self._init(np.int64(1), f"{base}_one")], base, nodes)
        owner = self._node("Unsqueeze", [self._node("Div", [rows, self._init(np.asarray(block, np.int64),
                                                                                f"{base}_block")], base, nodes),
                                         self._const_shape([1], f"{base}_axis")], base, nodes)
        blocks = self._init(np.arange(k // block, dtype=np.int64)[None, :], f"{base}_blocks")
        return self._node("Cast", [self._node("Equal", [owner, blocks], base, nodes)], base, nodes,
                          to=onnx.TensorProto.FLOAT)

    def _matmul_nbits(self, x: str, part: BlockQuant, out: str, nodes: list[onnx.NodeProto], base: str,
                      shared: tuple[str, str] | None = None) -> None:
        n, k = part.shape
        if shared is None:
            shared = (self._init(part.packed(), f"{base}_B"), self._scales(part, base, nodes))
        inputs = [x, *shared]
        if part.zero_points is not None:
            inputs.append(self._init(part.packed_zero_points(), f"{base}_zp"))
        main = out if part.offsets is None else self._name(f"{base}_main")
        nodes.append(helper.make_node("MatMulNBits", inputs, [main], name=self._name(f"{base}_MatMulNBits"),
                                      domain=MS, K=k, N=n, bits=part.bits, block_size=part.block,
                                      accuracy_level=self.accuracy_level))
        if part.offsets is not None:
            sums = self._block_sum(x, k, part.block, nodes)
            off = self._name(f"{base}_offsets_out")
            offsets = self._offsets(part, shared[1], base, nodes, transposed=True)
            nodes.append(helper.make_node("MatMul", [sums, offsets], [off],
                                          name=self._name(f"{base}_Offsets")))
            nodes.append(helper.make_node("Add", [main, off], [out], name=self._name(f"{base}_AddOffsets")))

    def matmul(self, x: str, parts: list[BlockQuant], out: str, base: str,
               table: str | None = None) -> list[onnx.NodeProto]:
        """Nodes computing ``out = x @ W.T`` for W = the stacked parts (``table``: a tied table's initializer name)."""
        nodes: list[onnx.NodeProto] = []
        runs = _runs(parts)
        if len(runs) == 1:
            shared = self.table_data(table, runs[0], nodes) if table else None
            self._matmul_nbits(x, runs[0], out, nodes, base, shared)
            return nodes
        outs = []
        for i, run in enumerate(runs):
            outs.append(self._name(f"{base}_part{i}"))
            self._matmul_nbits(x, run, outs[-1], nodes, f"{base}_part{i}")
        nodes.append(helper.make_node("Concat", outs, [out], name=self._name(f"{base}_Concat"), axis=-1))
        return nodes

    def gather(self, table: BlockQuant, indices: str, out: str, base: str, table_name: str,
               shared: bool) -> list[onnx.NodeProto]:
        """Nodes computing ``out = table_float[indices]`` with GatherBlockQuantized (rank-2 indices).

        ``shared``: other operators read the same table (a tied LM head), so it keeps the form they read.
        A table only looked up, with 5- or 6-bit codes in 8 bits (GGUF Q5_0, Q6_K), is stored as a 4-bit
        part plus a high part instead (``BlockQuant.four_plus_two``): 2 bits for Q6_K, and for Q5_0, whose
        high part is one bit, a bit plane (``_gather_plane``), so the table takes its GGUF size (5 bits
        and a float16 scale per 32 weights). A lookup reads one row per token, so the second lookup and
        its Add cost microseconds a step (Qwen2.5-Coder-0.5B's Q5_0 table: 93 MB instead of 145 in 8 bits,
        on disk and in memory).
        """
        v, k = table.shape
        nb = table.n_blocks
        nodes: list[onnx.NodeProto] = []
        plane = None if shared else table.four_plus_one()
        pair = None if shared or plane is not None else table.four_plus_two()
        if plane is None and pair is None:
            data, scales2d = self.table_data(table_name, table, nodes)
            blocks = self._gather_blocks(table, data, scales2d, indices, base, nodes)
            if table.offsets is not None:
                off = self._name(f"{base}_row_offsets")
                table_off = self._name(f"{base}_offsets3d")
                nodes.append(helper.make_node("Reshape", [self._offsets(table, scales2d, base, nodes),
                                                          self._const_shape([v, nb, 1], f"{base}_offsets_shape")],
                                              [table_off], name=self._name(f"{base}_OffsetsReshape")))
                nodes.append(helper.make_node("Gather", [table_off, indices], [off],
                                              name=self._name(f"{base}_GatherOffsets")))
                blocks = self._node("Add", [blocks, off], f"{base}_shifted", nodes)
        else:
            low = plane.low if plane is not None else pair[0]
            low_scales = self._scales(low, f"{base}_table_low", nodes)
            high_scales = self._node("Mul", [low_scales, self._init(np.asarray(16, np.float32), f"{base}_x16")],
                                     base, nodes)
            parts = [self._gather_blocks(low, self._init(low.packed(), f"{base}_table_low"), low_scales, indices,
                                         f"{base}_low", nodes)]
            if plane is not None:
                parts.append(self._gather_plane(plane.plane, plane.zero_point, low, high_scales, indices,
                                                f"{base}_high", nodes))
            else:
                high = pair[1]
                parts.append(self._gather_blocks(high, self._init(high.packed(), f"{base}_table_high"), high_scales,
                                                 indices, f"{base}_high", nodes))
            blocks = self._node("Add", parts, base, nodes)
        nodes.append(helper.make_node("Reshape", [blocks, self._const_shape([0, 0, k], f"{base}_shape")], [out],
                                      name=self._name(f"{base}_Reshape")))
        return nodes

    def _gather_plane(self, plane: np.ndarray, zero_point: float, like: BlockQuant, scales2d: str, indices: str,
                      base: str, nodes: list[onnx.NodeProto]) -> str:
        """(code - ``zero_point``) * scale of a bit plane's rows at ``indices``, (batch, seq, K / block, block)
        float32, blocked like ``like``.

        Plain ONNX ops of opset 11 (Gather, BitShift, Mod, Cast), since GatherBlockQuantized holds 2 bits at
        the least: the byte of each group of 8 codes shifted right by 0..7, modulo 2, is the codes in order
        (``BlockQuant.four_plus_one``). The float32 arithmetic is exact (see there).
        """
        v, nb = like.scales.shape
        rows = self._node("Gather", [self._init(plane, f"{base}_plane"), indices], base, nodes, axis=0)
        grouped = self._node("Unsqueeze", [rows, self._const_shape([-1], f"{base}_last")], base, nodes)
        shifted = self._node("BitShift", [grouped, self._init(np.arange(8, dtype=np.uint8), f"{base}_shifts")], base,
                             nodes, direction="RIGHT")
        bits = self._node("Mod", [shifted, self._init(np.asarray(2, np.uint8), f"{base}_two")], base, nodes)
        codes = self._node("Reshape", [self._node("Cast", [bits], base, nodes, to=onnx.TensorProto.FLOAT),
                                       self._const_shape([0, 0, nb, like.block], f"{base}_blocks_shape")], base, nodes)
        if zero_point:
            codes = self._node("Sub", [codes, self._init(np.asarray(zero_point, np.float32), f"{base}_zp")], base,
                               nodes)
        scales = self._node("Reshape", [scales2d, self._const_shape([v, nb, 1], f"{base}_scales_shape")], base, nodes)
        row_scales = self._node("Gather", [scales, indices], base, nodes, axis=0)
        return self._node("Mul", [codes, row_scales], base, nodes)

    def _gather_blocks(self, part: BlockQuant, data: str, scales2d: str, indices: str, base: str,
                       nodes: list[onnx.NodeProto]) -> str:
        """One GatherBlockQuantized over ``part``'s packed codes: (batch, seq, K / block, block) float32."""
        v, nb = part.scales.shape
        scales = self._name(f"{base}_gather_scales")
        nodes.append(helper.make_node("Reshape", [scales2d, self._const_shape([v, nb, 1], f"{base}_scales_shape")],
                                      [scales], name=self._name(f"{base}_ScalesReshape")))
        inputs = [data, indices, scales]
        if part.zero_points is not None:
            inputs.append(self._init(part.zero_points.reshape(v, nb, 1), f"{base}_gather_zp"))
        blocks = self._name(f"{base}_blocks")
        nodes.append(helper.make_node("GatherBlockQuantized", inputs, [blocks], name=self._name(f"{base}_Gather"),
                                      domain=MS, gather_axis=0, quantize_axis=2, block_size=part.block,
                                      bits=part.bits))
        return blocks


def _runs(parts: list[BlockQuant]) -> list[BlockQuant]:
    """Consecutive parts of one kind stacked; if that leaves many small runs, one common form instead."""
    runs: list[list[BlockQuant]] = []
    for part in parts:
        if runs and runs[-1][0].kind == part.kind:
            runs[-1].append(part)
        else:
            runs.append([part])
    if len(runs) > 3:  # a patchwork: one node of the widest form beats many small ones
        return [concat_rows(common_form(parts))]
    return [concat_rows(run) for run in runs]


def rewrite(model: onnx.ModelProto, scheme: Scheme, vocab_size: int | None = None,
            log: Callable[[str], None] = print, accuracy_level: int = ACCURACY_LEVEL) -> Report:
    """Replace, in place, every weight matrix the scheme quantizes; returns what was done.

    ``accuracy_level`` 0 makes MatMulNBits compute in float32 (exact, 3x slower or worse): what the
    tests use to show that the rewritten weights equal the originals.
    """
    b = _Builder(model, scheme, vocab_size, log, accuracy_level)
    graph = model.graph
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)

    def is_table(name: str) -> bool:
        return name in b.inits and any(u.op_type == "Gather" and u.input[0] == name for u in users.get(name, []))

    merged = _merge_siblings(b, graph, users, vocab_size)
    out_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        replacement = None
        if id(node) in merged:
            replacement = merged[id(node)]
        elif node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and node.input[1] in b.inits \
                and node.input[0] not in b.inits:
            w_name = node.input[1]
            shape = tuple(b.inits[w_name].dims)
            role = "head" if len(shape) == 2 and vocab_size and shape[1] == vocab_size else "linear"
            parts = b.parts(w_name, rows_are_outputs=False, role=role)
            if parts:
                replacement = b.matmul(node.input[0], parts, node.output[0], _base(w_name))
        elif _plain_fused_matmul(node) and node.input[1] in b.inits:
            w_name = node.input[1]
            trans_b = bool(node_attr(node, "transB", 0))
            tied = is_table(w_name)
            role = "embedding" if tied else "head"
            parts = b.parts(w_name, rows_are_outputs=trans_b, role=role)
            if parts:
                table = w_name if tied and trans_b else None
                replacement = b.matmul(node.input[0], parts, node.output[0], _base(w_name), table)
        elif node.op_type == "Gather" and node.domain in ("", "ai.onnx") and node.input[0] in b.inits \
                and node_attr(node, "axis", 0) == 0 and len(b.inits[node.input[0]].dims) == 2:
            t_name = node.input[0]
            if node.input[1] == "input_ids":  # the word embeddings; position and token-type tables stay float
                parts = b.parts(t_name, rows_are_outputs=True, role="embedding")
                if parts and len(_runs(parts)) == 1:
                    table = concat_rows(parts)
                    shared = any(u is not node for u in users.get(t_name, []))
                    replacement = b.gather(table, node.input[1], node.output[0], _base(t_name), t_name, shared)
        out_nodes.extend(replacement if replacement is not None else [node])
        if replacement is not None:
            b.report.nodes[node.op_type] = b.report.nodes.get(node.op_type, 0) + 1

    del graph.node[:]
    graph.node.extend(out_nodes)
    graph.initializer.extend(b.new_inits)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    if not any(o.domain == MS for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS, 1))
    b.report.weight_bytes = sum(_nbytes(t) for t in graph.initializer)
    return b.report


def _plain_matmul(node: onnx.NodeProto, b: "_Builder") -> bool:
    return (node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and node.input[1] in b.inits
            and node.input[0] not in b.inits and len(b.inits[node.input[1]].dims) == 2)


def _merge_siblings(b: "_Builder", graph: onnx.GraphProto, users: dict[str, list[onnx.NodeProto]],
                    vocab_size: int | None) -> dict[int, list[onnx.NodeProto]]:
    """One MatMulNBits (then a Split) for the projections that read the same activation (gate and up, or q, k and v
    when the export did not fuse them) and quantize to the same kind: fewer kernels per token, and one block-sum
    and offset product where the format has offsets. Returns node id -> replacement (an empty list for the
    siblings folded into the first)."""
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if _plain_matmul(node, b) and len(users.get(node.input[1], [])) == 1:
            groups.setdefault(node.input[0], []).append(node)
    out: dict[int, list[onnx.NodeProto]] = {}
    for x, nodes in groups.items():
        if len(nodes) < 2:
            continue
        weights = [n.input[1] for n in nodes]
        if any(vocab_size and b.inits[w].dims[1] == vocab_size for w in weights):
            continue
        parts = [b.parts(w, rows_are_outputs=False, role="linear") for w in weights]
        if any(p is None or len(_runs(p)) != 1 for p in parts):
            continue
        runs = [_runs(p)[0] for p in parts]
        if len({r.kind for r in runs}) != 1:
            continue
        base = _base(weights[0]) + "_merged"
        joined = b._name(f"{base}_out")
        nodes_out = b.matmul(x, [concat_rows(runs)], joined, base)
        sizes = b._const_shape([r.shape[0] for r in runs], f"{base}_split")
        nodes_out.append(helper.make_node("Split", [joined, sizes], [n.output[0] for n in nodes],
                                          name=b._name(f"{base}_Split"), axis=-1))
        out[id(nodes[0])] = nodes_out
        for n in nodes[1:]:
            out[id(n)] = []
    return out


def _half_exact(a: np.ndarray) -> bool:
    return bool(np.array_equal(a.astype(np.float16).astype(np.float32), a))


def _base(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")[:60] or "w"


def _nbytes(t: onnx.TensorProto) -> int:
    n = int(np.prod(t.dims)) if t.dims else 1
    return n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
