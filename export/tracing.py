"""``torch.onnx.export`` (TorchScript) without its biggest transient copy of the weights.

The exporter's final ONNX shape-inference pass is given every parameter and, node by node,
copies the ones a node reads into a small ONNX proto (then serialized and parsed again) to
infer that node's output types. For the embedding table that is several copies of the largest
tensor at once: on Qwen2.5 0.5B it took the export from 3.2 GB to 5.3 GB of RSS. Shapes never
depend on the *values* of weight matrices, only on small constants (Reshape targets, split
sizes), so the pass is given the small tensors only; the large ones stay typed graph values.
Export validation then checks the graph against PyTorch as always.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

VALUES_NEEDED_BELOW = 1 << 20
"""Parameters under this many bytes are passed to shape inference with their values."""


@contextlib.contextmanager
def lean_shape_inference() -> Iterator[None]:
    name = "_jit_pass_onnx_graph_shape_type_inference"
    original = getattr(torch._C, name, None)
    if original is None:  # another torch: nothing to trim, export as it is
        yield
        return

    def inference(graph: Any, params_dict: dict, *args: Any, **kwargs: Any) -> Any:
        small = {k: v for k, v in params_dict.items()
                 if not isinstance(v, torch.Tensor) or v.numel() * v.element_size() < VALUES_NEEDED_BELOW}
        return original(graph, small, *args, **kwargs)

    setattr(torch._C, name, inference)
    try:
        yield
    finally:
        setattr(torch._C, name, original)
