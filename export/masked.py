"""Masked LM export: ids (and token types where the model has them) in, logits out."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgelm.export.tracing import lean_shape_inference


class MaskedLMWrapper(nn.Module):
    def __init__(self, model: nn.Module, input_names: list[str]):
        super().__init__()
        self.model = model
        self.input_names = input_names

    def forward(self, *tensors):
        return self.model(**dict(zip(self.input_names, tensors))).logits


def masked_input_names(model: nn.Module, tokenizer: Any) -> list[str]:
    """The tokenizer's inputs that the model's forward accepts, in a fixed order."""
    accepted = set(inspect.signature(model.forward).parameters)
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tokenizer.model_input_names]
    return [n for n in names if n in accepted]


def export_masked(model: nn.Module, tokenizer: Any, onnx_path: Path, opset: int = 17) -> tuple[list[str], list[str]]:
    names = masked_input_names(model, tokenizer)
    wrapper = MaskedLMWrapper(model, names).eval()
    dummy = tuple(torch.ones((2, 5), dtype=torch.long) if n != "token_type_ids" else torch.zeros((2, 5), dtype=torch.long)
                  for n in names)
    axes = {n: {0: "batch_size", 1: "sequence_length"} for n in names}
    axes["logits"] = {0: "batch_size", 1: "sequence_length"}
    with torch.no_grad(), lean_shape_inference():
        torch.onnx.export(wrapper, dummy, str(onnx_path), input_names=names, output_names=["logits"],
                          dynamic_axes=axes, opset_version=opset, do_constant_folding=True, dynamo=False)
    return names, ["logits"]
