"""What one MatMulNBits costs by rows fed at once: the price of a speculative verify pass on this CPU.

    python benchmarks/matmulnbits_rows.py [--shapes 1536x8960 8960x1536] [--rows 1 2 4 6] [--threads 2]
        [--chain L]

A draft model pays only if the target reads k+1 tokens in much less than k+1 times one token's time.
Decoding one token is a matrix-vector product that streams the weights; several tokens share that
stream, so on a machine where the stream is the cost a few rows come almost free. This times one
product alone (random codes; the weights stay in cache, so it shows the compute side) for each block
format, at ``accuracy_level`` 4 (int8 compute, what edgelm's exports use), and prints each row count's
time over one row's. ``--chain 28`` times 28 pairs of products instead, each with weights of its own
(a 1.5B model's MLPs, hundreds of MB), so that the weights stream from memory as in a real decode step:
the two regimes price extra rows very differently (see the README's speculative bullet).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgelm.export.quant.blocks import BlockQuant

FORMATS = (("4-bit, blocks of 32", 4, 32, False), ("4-bit, blocks of 32, zero points", 4, 32, True),
           ("4-bit, blocks of 64", 4, 64, False), ("8-bit, blocks of 32", 8, 32, False))


def matrix(rng: np.random.Generator, k: int, n: int, bits: int, block: int, zero_points: bool) -> BlockQuant:
    """Random codes, scales and (optionally) zero points for an N x K product; the scales keep a chain's
    activations near 1, so 28 pairs of products neither overflow nor vanish."""
    blocks = k // block
    return BlockQuant(rng.integers(0, 2 ** bits, (n, k), dtype=np.uint8),
                      (rng.random((n, blocks)) * (0.5 / np.sqrt(k))).astype(np.float32), bits, block,
                      rng.integers(0, 2 ** bits, (n, blocks), dtype=np.uint8) if zero_points else None)


def matrices(k: int, n: int, bits: int, block: int, zero_points: bool, chain: int = 0) -> list[BlockQuant]:
    """One K->N product, or with ``chain`` L, L pairs of a K->N and an N->K product, each with weights of its
    own (a model's MLPs: the weights no longer fit in any cache and stream from memory, as in a decode step)."""
    rng = np.random.default_rng(0)
    shapes = [(k, n), (n, k)] * chain if chain else [(k, n)]
    return [matrix(rng, kk, nn, bits, block, zero_points) for kk, nn in shapes]


def model(mats: list[BlockQuant]) -> onnx.ModelProto:
    """The products in order, each a MatMulNBits packed by the exporter's own ``BlockQuant`` (so the layout
    is the one edgelm's exports ship), at accuracy_level 4."""
    nodes, inits, x = [], [], "A"
    for i, m in enumerate(mats):
        n, k = m.shape
        inputs = [x, f"B{i}", f"S{i}"]
        inits += [numpy_helper.from_array(m.packed(), f"B{i}"), numpy_helper.from_array(m.scales, f"S{i}")]
        if m.zero_points is not None:
            inits.append(numpy_helper.from_array(m.packed_zero_points(), f"Z{i}"))
            inputs.append(f"Z{i}")
        x = f"Y{i}"
        nodes.append(helper.make_node("MatMulNBits", inputs, [x], domain="com.microsoft", K=k, N=n, bits=m.bits,
                                      block_size=m.block, accuracy_level=4))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", mats[0].shape[1]])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["M", mats[-1].shape[0]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)])


def session(mats: list[BlockQuant], threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model(mats).SerializeToString(), opts, providers=["CPUExecutionProvider"])


def time_rows(sess: ort.InferenceSession, k: int, rows: int, repeats: int) -> float:
    """Median microseconds of one run with ``rows`` rows (after 5 warm-up runs)."""
    a = np.random.default_rng(1).standard_normal((rows, k)).astype(np.float32)
    for _ in range(5):
        sess.run(None, {"A": a})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, {"A": a})
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["1536x8960", "8960x1536"], metavar="KxN",
                    help="input x output sizes (default: Qwen2.5-Coder-1.5B's MLP products)")
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 6], help="rows fed at once (default 1 2 4 6)")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    ap.add_argument("--repeats", type=int, default=40, help="timed runs per row count (default 40)")
    ap.add_argument("--chain", type=int, default=0, metavar="L",
                    help="time L pairs of a KxN and an NxK product, each with its own weights, instead of one "
                         "product: weights streamed from memory as in a decode step (28 is Qwen2.5-Coder-1.5B's "
                         "layer count; 8-bit then takes about 1 GB while the session loads)")
    args = ap.parse_args(argv)
    if 1 not in args.rows:
        ap.error("--rows must include 1: every figure is read against one row")
    if args.chain < 0:
        ap.error("--chain must be 0 (one product) or a number of product pairs")
    unit = "ms" if args.chain else "us"
    print(f"| {'L x (K x N, N x K)' if args.chain else 'K x N'} | format | {' | '.join(f'{r} rows {unit}' for r in args.rows)} | "
          f"{' | '.join(f'{r} / 1' for r in args.rows if r != 1)} |")
    print("|---|---|" + "---|" * (2 * len(args.rows) - 1))
    for shape in args.shapes:
        try:
            k, n = (int(v) for v in shape.lower().split("x"))
        except ValueError:
            ap.error(f"--shapes {shape!r}: write KxN, e.g. 1536x8960")
        for label, bits, block, zp in FORMATS:
            if k % block or (args.chain and n % block):
                continue
            sess = session(matrices(k, n, bits, block, zp, args.chain), args.threads)
            us = {r: time_rows(sess, k, r, args.repeats) for r in args.rows}
            del sess
            name = f"{args.chain} x ({k} x {n}, {n} x {k})" if args.chain else f"{k} x {n}"
            shown = {r: us[r] / 1000 for r in us} if args.chain else us
            print(f"| {name} | {label} | {' | '.join(f'{shown[r]:.{1 if args.chain else 0}f}' for r in args.rows)} | "
                  f"{' | '.join(f'{us[r] / us[1]:.2f}' for r in args.rows if r != 1)} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
