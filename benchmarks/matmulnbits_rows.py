"""What one MatMulNBits costs by rows fed at once: the price of a speculative verify pass on this CPU.

    python benchmarks/matmulnbits_rows.py [--shapes 1536x8960 8960x1536] [--rows 1 2 4 6] [--threads 2]

A draft model pays only if the target reads k+1 tokens in much less than k+1 times one token's time.
Decoding one token is a matrix-vector product that streams the weights; several tokens share that
stream, so on a machine where the stream is the cost a few rows come almost free. This times one
product alone (random codes; the weights stay in cache, so it shows the compute side) for each block
format, at ``accuracy_level`` 4 (int8 compute, what edgelm's exports use), and prints each row count's
time over one row's.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

FORMATS = (("4-bit, blocks of 32", 4, 32, False), ("4-bit, blocks of 32, zero points", 4, 32, True),
           ("4-bit, blocks of 64", 4, 64, False), ("8-bit, blocks of 32", 8, 32, False))


def model(k: int, n: int, bits: int, block: int, zero_points: bool) -> onnx.ModelProto:
    """One MatMulNBits with random codes and scales, shaped as edgelm's exports store it."""
    rng = np.random.default_rng(0)
    blocks = k // block
    inits = [numpy_helper.from_array(rng.integers(0, 256, (n, blocks, block * bits // 8), dtype=np.uint8), "B"),
             numpy_helper.from_array((rng.random(n * blocks) * 0.01).astype(np.float32), "S")]
    inputs = ["A", "B", "S"]
    if zero_points:
        packed = n * ((blocks * bits + 7) // 8)
        inits.append(numpy_helper.from_array(rng.integers(0, 256, packed, dtype=np.uint8), "Z"))
        inputs.append("Z")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=4)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)])


def session(k: int, n: int, bits: int, block: int, zero_points: bool, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model(k, n, bits, block, zero_points).SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


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
    args = ap.parse_args(argv)
    if 1 not in args.rows:
        ap.error("--rows must include 1: every figure is read against one row")
    print(f"| K x N | format | {' | '.join(f'{r} rows us' for r in args.rows)} | "
          f"{' | '.join(f'{r} / 1' for r in args.rows if r != 1)} |")
    print("|---|---|" + "---|" * (2 * len(args.rows) - 1))
    for shape in args.shapes:
        try:
            k, n = (int(v) for v in shape.lower().split("x"))
        except ValueError:
            ap.error(f"--shapes {shape!r}: write KxN, e.g. 1536x8960")
        for label, bits, block, zp in FORMATS:
            if k % block:
                continue
            sess = session(k, n, bits, block, zp, args.threads)
            us = {r: time_rows(sess, k, r, args.repeats) for r in args.rows}
            print(f"| {k} x {n} | {label} | {' | '.join(f'{us[r]:.0f}' for r in args.rows)} | "
                  f"{' | '.join(f'{us[r] / us[1]:.2f}' for r in args.rows if r != 1)} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
