"""The export checks the tokenizer it ships: the raw AntiBERTy folder (no tokenizer config) is the case in point."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
import zipfile

import pytest

from edgelm.export.tokenizer_check import parse_options
from edgelm.runtime.errors import ExportError

RAW = {
    "antiberty/trained_models/AntiBERTy_md_smooth/config.json": "config.json",
    "antiberty/trained_models/AntiBERTy_md_smooth/pytorch_model.bin": "pytorch_model.bin",
    "antiberty/trained_models/vocab.txt": "vocab.txt",
}


@pytest.fixture(scope="module")
def raw_antiberty(tmp_path_factory):
    """AntiBERTy as its wheel ships it: config.json, pytorch_model.bin, vocab.txt, and no tokenizer config."""
    from edgelm.models.real import ANTIBERTY_WHEEL, fetch_wheel

    folder = tmp_path_factory.mktemp("raw-antiberty")
    with zipfile.ZipFile(fetch_wheel(*ANTIBERTY_WHEEL, log=lambda s: None)) as zf:
        for member, name in RAW.items():
            (folder / name).write_bytes(zf.read(member))
    return folder


def test_parse_options():
    assert parse_options(["do_lower_case=false", "model_max_length=512", "x=0.5", "name=abc"]) == {
        "do_lower_case": False, "model_max_length": 512, "x": 0.5, "name": "abc"}
    with pytest.raises(ExportError, match="KEY=VALUE"):
        parse_options(["novalue"])


@pytest.mark.real
def test_raw_antiberty_exports_with_the_lower_casing_fixed(raw_antiberty, tmp_path):
    """transformers lower-cases this folder's input and maps every residue to [UNK]; the export notices, switches it
    off with a notice, and fill-mask then reads the residues."""
    from edgelm.export import export_model
    from edgelm.runtime import MaskedLM

    lines = []
    man = export_model(raw_antiberty, tmp_path / "out", log=lines.append)
    assert any("do_lower_case=false" in line for line in lines)
    report = man.validation["tokenizer"]
    assert report["applied"] == {"do_lower_case": False} and report["vocab_unknown"] == 0.0
    assert report["text_lines_equal"] == report["text_lines"]
    lm = MaskedLM.load(tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the residues are read: no unknown-token warning
        top = lm.fill_mask("E V Q L [MASK] E S G G G L V Q P G G S L R L S C A A S", top_k=1)[0]
    assert top["token_str"] in "ACDEFGHIKLMNPQRSTVWY" and top["score"] > 0.3


@pytest.mark.real
def test_forcing_the_wrong_case_stops_the_export(raw_antiberty, tmp_path):
    from edgelm.export import export_model

    with pytest.raises(ExportError, match=r"100% of the tokenizer's vocabulary encodes to the unknown token.*"
                                          r"do_lower_case=false"):
        export_model(raw_antiberty, tmp_path / "out", tokenizer_options={"do_lower_case": True}, log=lambda s: None)
    assert not (tmp_path / "out").exists()
    proc = subprocess.run([sys.executable, "-m", "edgelm.cli", "export", str(raw_antiberty), str(tmp_path / "cli"),
                           "--tokenizer-option", "do_lower_case=true"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "--tokenizer-option" in proc.stderr


def test_export_records_tokenizer_agreement(exported):
    report = json.loads((exported("tiny-llama") / "edgelm.json").read_text())["validation"]["tokenizer"]
    assert report["text_lines_equal"] == report["text_lines"] == 8
    assert report["vocab_unknown"] < 0.5 and report["vocab_tokens_tried"] > 100


@pytest.mark.real
def test_runtime_warns_when_a_prompt_is_mostly_unknown(exported):
    from edgelm.runtime import MaskedLM

    lm = MaskedLM.load(exported("antiberty"))
    with pytest.warns(UserWarning, match=r"8 of the 8 tokens .* unknown token '\[UNK\]'"):
        lm.tokenizer.encode("e v q l e s g g")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lm.tokenizer.encode("E V Q L E S G G")
