"""`edgelm draft`: an export whose LM head keeps the frequent tokens, as an assisted-decoding draft."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgelm.runtime import CausalLM, GenerationConfigError
from edgelm.runtime.errors import ExportError, ModelLoadError

PROMPT = np.array([[5, 17, 99, 3, 5, 17, 99, 3, 5, 17, 250, 8]], np.int64)
KEEP = 250


@pytest.fixture(scope="module")
def drafts(exported, tmp_path_factory):
    """Cut drafts of tiny-llama: from its int4 export (a MatMulNBits head sharing the embedding's table) and from
    its float32 export."""
    from edgelm.export.draft import make_draft

    out = tmp_path_factory.mktemp("drafts")
    made = {}
    for scheme, source in (("int4", exported("tiny-llama", quantize="int4")), ("none", exported("tiny-llama"))):
        make_draft(source, out / scheme, KEEP, log=lambda s: None)
        made[scheme] = (source, out / scheme)
    return made


def _logits(lm: CausalLM, ids: np.ndarray) -> np.ndarray:
    n = ids.shape[1]
    logits, _ = lm.decoder.step(ids, np.ones((1, n), np.int64), np.arange(n)[None], lm.decoder.new_cache(1))
    return logits


@pytest.mark.parametrize("scheme", ["int4", "none"])
def test_cut_head_scores_the_kept_tokens_as_the_source_does(drafts, scheme):
    source, folder = drafts[scheme]
    man = json.loads((folder / "edgelm.json").read_text())
    eos = json.loads((source / "edgelm.json").read_text())["eos_token_id"]
    kept = list(range(KEEP)) + man["draft_vocab"]["extra"]
    assert man["draft_vocab"]["first"] == KEEP and man["format_version"] == 2
    assert all(e in kept for e in eos)
    full, cut = CausalLM.load(source), CausalLM.load(folder)
    np.testing.assert_array_equal(cut.decoder.token_ids, kept)
    ref, got = _logits(full, PROMPT), _logits(cut, PROMPT)
    assert got.shape == (1, PROMPT.shape[1], len(kept)) and ref.shape[-1] == 400
    np.testing.assert_allclose(got, ref[..., kept], rtol=0, atol=1e-5 * np.abs(ref).max())


def test_drafting_with_a_cut_head_keeps_greedy_output_and_proposes_kept_tokens(drafts, exported):
    from edgelm.runtime.strategies.assisted import DraftModelCandidates

    target = CausalLM.load(exported("tiny-llama"))
    source, folder = drafts["int4"]
    cut, full = CausalLM.load(folder), CausalLM.load(source)
    greedy = target.generate(PROMPT, max_new_tokens=30, eos_token_id=None)
    for kw in (dict(), dict(num_assistant_tokens=3, num_assistant_tokens_schedule="heuristic")):
        out = target.generate(PROMPT, max_new_tokens=30, eos_token_id=None, assistant_model=cut, **kw)
        np.testing.assert_array_equal(out, greedy)
    # Its picks are the full draft's best kept token, mapped back to token ids.
    cfg = type("Cfg", (), dict(num_assistant_tokens=6, num_assistant_tokens_schedule="constant",
                               assistant_confidence_threshold=0.0, eos_ids=[]))()
    proposed, _ = DraftModelCandidates(cut, cfg).get(PROMPT[0], limit=6)
    seq, expected = list(PROMPT[0]), []
    kept = cut.decoder.token_ids
    for _ in range(6):
        row = _logits(full, np.asarray([seq + expected], np.int64))[0, -1]
        expected.append(int(kept[np.argmax(row[kept])]))
    np.testing.assert_array_equal(proposed, expected)
    assert all(t in set(kept.tolist()) for t in proposed)


def test_sampling_with_a_cut_draft_gives_no_probability_to_tokens_it_lacks(drafts, exported):
    """Under sampling the draft's scores cover the whole vocabulary, -inf where the cut head has no row, so that
    speculative sampling's residual (target minus draft) supplies those tokens."""
    from edgelm.runtime.strategies.assisted import DraftModelCandidates

    cut = CausalLM.load(drafts["int4"][1])
    cfg = type("Cfg", (), dict(num_assistant_tokens=4, num_assistant_tokens_schedule="constant",
                               assistant_confidence_threshold=0.0, eos_ids=[]))()
    proposed, scores = DraftModelCandidates(cut, cfg).get(PROMPT[0], limit=4, processors=lambda ids, s: s,
                                                          rng=np.random.default_rng(0))
    kept = cut.decoder.token_ids
    lacking = np.setdiff1d(np.arange(400), kept)
    assert scores.shape == (len(proposed), 400)
    assert np.isneginf(scores[:, lacking]).all() and np.isfinite(scores[:, kept]).all()
    assert set(proposed.tolist()) <= set(kept.tolist())
    target = CausalLM.load(exported("tiny-llama"))
    a = target.generate(PROMPT, max_new_tokens=20, do_sample=True, seed=3, assistant_model=cut)
    np.testing.assert_array_equal(a, target.generate(PROMPT, max_new_tokens=20, do_sample=True, seed=3,
                                                     assistant_model=cut))
    assert a.shape == (1, PROMPT.shape[1] + 20) and 0 <= a.min() and a.max() < 400


def test_a_cut_draft_cannot_generate_alone_and_bad_cuts_are_refused(drafts, exported, tmp_path):
    from edgelm.export.draft import make_draft

    source, folder = drafts["int4"]
    with pytest.raises(GenerationConfigError, match="assistant_model"):
        CausalLM.load(folder).generate(PROMPT, max_new_tokens=3)
    for keep, match in ((0, "between 1 and 399"), (400, "between 1 and 399")):
        with pytest.raises(ExportError, match=match):
            make_draft(source, tmp_path / "x", keep, log=lambda s: None)
    with pytest.raises(ExportError, match="already a draft"):
        make_draft(folder, tmp_path / "x", 100, log=lambda s: None)
    with pytest.raises(ExportError, match="its own folder"):
        make_draft(source, source, 100, log=lambda s: None)
    with pytest.raises(ExportError, match="masked-lm"):
        make_draft(exported("tiny-bert"), tmp_path / "x", 100, log=lambda s: None)
    assert not (tmp_path / "x").exists()  # nothing half-written
    # A manifest that claims a cut the graph does not have is caught at load.
    bad = tmp_path / "bad"
    bad.mkdir()
    for item in folder.iterdir():
        (bad / item.name).symlink_to(item)
    (bad / "edgelm.json").unlink()
    man = json.loads((folder / "edgelm.json").read_text())
    man["draft_vocab"]["first"] = 100
    (bad / "edgelm.json").write_text(json.dumps(man))
    with pytest.raises(ModelLoadError, match="columns"):
        CausalLM.load(bad)


def test_draft_command(exported, tmp_path, capsys):
    from edgelm.cli.main import main

    assert main(["draft", str(exported("tiny-llama", quantize="int4")), str(tmp_path / "d"), "--keep", "300"]) == 0
    assert "logits equal the source's" in capsys.readouterr().err
    assert json.loads((tmp_path / "d" / "edgelm.json").read_text())["draft_vocab"]["first"] == 300
    assert main(["draft", str(exported("tiny-llama", quantize="int4")), str(tmp_path / "d"), "--keep", "300"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_a_draft_of_a_float32_export_leaves_the_greedy_head_out(drafts):
    """The greedy head's candidates index the whole vocabulary, which a cut head no longer covers: the draft
    drops it (input, outputs, its 8-bit table and bound) and says so in its manifest; its logits stay the
    source's at the kept ids (the test above)."""
    source, folder = drafts["none"]
    src, man = (json.loads((f / "edgelm.json").read_text()) for f in (source, folder))
    assert "greedy_head" in src["inputs"] and "greedy_head" in src["validation"]
    assert not {"greedy_head", "greedy_ids", "greedy_logits"} & set(man["inputs"] + man["outputs"])
    assert "greedy_head" not in man["validation"]
    assert not CausalLM.load(folder).decoder.greedy_head and CausalLM.load(source).decoder.greedy_head

    def head_bytes(f):  # the greedy head's tables (its switch and the gate on the logits stay, a few bytes)
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(f / "model.onnx"))
        return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer if t.name.startswith("greedy_head"))

    assert head_bytes(source) > 0.9 * src["validation"]["greedy_head"]["bytes"] and head_bytes(folder) < 64
