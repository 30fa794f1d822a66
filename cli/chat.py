"""``edgelm chat MODEL_DIR``: an interactive terminal chat on a ``Conversation`` (the KV cache is kept between turns).

Replies stream as they are generated. Ctrl-C stops the current reply and keeps what was said
(a stopping criterion reads the flag the signal handler sets, so generation ends cleanly at the
next token instead of unwinding mid-step); Ctrl-D or /exit quits. Line editing and history come
from the standard library's readline where the platform has it.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

HELP = """commands:
  /reset          forget the conversation (keeps the system message)
  /retry          drop the last reply and generate it again
  /system TEXT    set the system message (/system alone removes it)
  /save FILE      write the messages as JSON
  /load FILE      read messages written by /save
  /stats          tokens/s, time to first token and cache reuse of the last reply
  /help           this list
  /exit           quit (Ctrl-D too); Ctrl-C stops a reply and keeps what it said"""


def add_chat(sub: Any) -> None:
    from edgelm.cli.main import add_generation_args, add_session_args

    p = sub.add_parser(
        "chat", help="chat with an exported causal LM in the terminal (the cache is kept between turns)",
        description="An interactive chat: each reply streams as it is generated and only the new part of the "
                    "conversation is prefilled each turn. Type /help for the commands.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_dir", help="a folder made by `edgelm export` from a model with a chat template")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--context-policy", choices=["error", "drop_oldest"], default="error",
                   help="past the model's context: stop with an error, or drop the oldest turns")
    add_generation_args(p)
    add_session_args(p)
    p.set_defaults(func=_cmd_chat, max_new_tokens=256)


class _Session:
    def __init__(self, conv: Any, kwargs: dict[str, Any], out: TextIO):
        self.conv = conv
        self.kwargs = kwargs
        self.out = out
        self.stop_requested = False
        self.stats: dict[str, Any] = {}

    # --- one reply ---------------------------------------------------------------------------
    def reply(self, text: str) -> None:
        from edgelm.runtime import TextStreamer

        stamps: list[float] = []

        def on_text(chunk: str, end: bool) -> None:
            self.out.write(chunk + ("\n" if end else ""))
            self.out.flush()

        class Clock(TextStreamer):
            def put(inner, value):  # noqa: N805 (the streamer's own self is ``inner``)
                if not inner.next_tokens_are_prompt:
                    stamps.append(time.perf_counter())
                super().put(value)

        streamer = Clock(self.conv.lm.tokenizer, skip_prompt=True, on_text=on_text, skip_special_tokens=True)
        self.stop_requested = False
        stop = [lambda ids, scores: self.stop_requested]
        start = time.perf_counter()
        previous = signal.signal(signal.SIGINT, self._on_interrupt)
        try:
            self.conv.send(text, streamer=streamer, stopping_criteria=stop, **self.kwargs)
        finally:
            signal.signal(signal.SIGINT, previous)
        if self.stop_requested:
            self.out.write(f"[stopped after {len(stamps)} tokens]\n")
        self.stats = {"tokens": len(stamps), "time_to_first_token_ms": 1000 * (stamps[0] - start) if stamps else None,
                      "tokens_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 2 else None,
                      **self.conv.last_stats}

    def _on_interrupt(self, signum: int, frame: Any) -> None:
        self.stop_requested = True

    # --- commands ------------------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run a /command; False means quit."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        conv = self.conv
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            self.out.write(HELP + "\n")
        elif name == "/reset":
            conv.reset(conv.system)
            self.out.write("[conversation reset]\n")
        elif name == "/retry":
            users = [m["content"] for m in conv.messages if m["role"] == "user"]
            if not users:
                self.out.write("[nothing to retry]\n")
            else:
                conv.rewind(1)
                self.reply(users[-1])
        elif name == "/system":
            conv.set_system(arg or None)
            self.out.write(f"[system message {'set' if arg else 'removed'}]\n")
        elif name == "/save":
            if not arg:
                self.out.write("[usage: /save FILE]\n")
            else:
                Path(arg).write_text(json.dumps(conv.messages, ensure_ascii=False, indent=2))
                self.out.write(f"[saved {len(conv.messages)} messages to {arg}]\n")
        elif name == "/load":
            if not arg:
                self.out.write("[usage: /load FILE]\n")
            else:
                conv.messages = json.loads(Path(arg).read_text())
                self.out.write(f"[loaded {len(conv.messages)} messages from {arg}]\n")
        elif name == "/stats":
            s = self.stats
            if not s:
                self.out.write("[no reply yet]\n")
            else:
                ttft = f"{s['time_to_first_token_ms']:.0f} ms" if s.get("time_to_first_token_ms") is not None else "-"
                tps = f"{s['tokens_per_s']:.1f}" if s.get("tokens_per_s") else "-"
                self.out.write(f"[last reply: {s['tokens']} tokens, {tps} tokens/s, first token after {ttft}; "
                               f"prompt {s.get('prompt_tokens')} tokens, {s.get('reused_tokens')} reused from the "
                               "cache]\n")
        else:
            self.out.write(f"[unknown command {name}; /help lists them]\n")
        return True


def _readline() -> None:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass


def _cmd_chat(args: argparse.Namespace) -> int:
    from edgelm.cli.main import _generation_kwargs, load_model
    from edgelm.runtime import CausalLM
    from edgelm.runtime.errors import EdgeLMError

    lm = load_model(CausalLM, args.model_dir, args, args.model_file)
    conv = lm.conversation(system=args.system, context_policy=args.context_policy)
    kwargs = _generation_kwargs(args)
    if args.assistant_model:
        kwargs["assistant_model"] = load_model(CausalLM, args.assistant_model, args)
    if args.seed is not None:
        kwargs["seed"] = args.seed
    session = _Session(conv, kwargs, sys.stdout)
    _readline()
    print(f"edgelm chat with {Path(args.model_dir).name}: /help for commands, Ctrl-D to quit", flush=True)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt, as shells do
            print()
            continue
        line = line.strip()
        if not line:
            continue
        try:
            if line.startswith("/"):
                if not session.command(line):
                    return 0
            else:
                session.reply(line)
        except (EdgeLMError, OSError, ValueError) as exc:  # a bad file for /load, a message past the context...
            print(f"[error: {exc}]", flush=True)
