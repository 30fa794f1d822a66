"""Conversations keep their cache between turns and still answer exactly what a stateless generate answers."""

from __future__ import annotations

import json
import os
import pty
import select
import sys
import threading
import time

import pytest

from edgelm.runtime import CausalLM, Conversation, TextStreamer
from edgelm.runtime.errors import InputError, UnsupportedError

QUESTIONS = ["What is the capital of France?", "And of Spain?", "Tell me a fact about its history.",
             "What language is spoken there?", "Name a famous painter from there.", "What is paella?",
             "How do you say hello in Spanish?", "Write a haiku about the sea.", "Thanks! Summarize our chat."]


@pytest.fixture(scope="module")
def smollm2(exported):
    return CausalLM.load(exported("smollm2-135m-instruct"), threads=2)


@pytest.mark.real
def test_greedy_turns_equal_stateless_generate_and_reuse_the_cache(smollm2):
    conv = smollm2.conversation(system="You are a helpful assistant.")
    for turn, question in enumerate(QUESTIONS):
        reply = conv.send(question, max_new_tokens=40)
        history = conv.messages[:-1]
        assert history[-1] == {"role": "user", "content": question}
        assert reply == smollm2.generate_text(history, chat=True, max_new_tokens=40), f"turn {turn + 1}"
        stats = conv.last_stats
        if turn:
            # everything up to the new user message comes from the cache
            assert stats["reused_tokens"] >= stats["prompt_tokens"] - 30, stats
    assert len(conv.messages) == 1 + 2 * len(QUESTIONS)


@pytest.mark.real
def test_template_that_rewrites_earlier_turns_stays_exact(exported):
    """A template that renders old assistant turns differently from how they were generated (here: it marks them
    as earlier) still gives stateless results; only the reuse shrinks (it stops where the previous reply starts)."""
    lm = CausalLM.load(exported("smollm2-135m-instruct"), threads=2)
    lm.tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}(earlier) {% endif %}{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    conv = lm.conversation()
    cached = 0
    for question in QUESTIONS[:4]:
        reply = conv.send(question, max_new_tokens=24)
        assert reply == lm.generate_text(conv.messages[:-1], chat=True, max_new_tokens=24)
        if cached:
            assert conv.last_stats["reused_tokens"] < cached, (cached, conv.last_stats)
        cached = conv.last_stats["prompt_tokens"] + conv.last_stats["new_tokens"] - 1  # what the cache now holds


@pytest.mark.real
def test_rewind_reset_and_sampling(smollm2):
    conv = smollm2.conversation()
    first = conv.send("Name a color.", max_new_tokens=12)
    conv.send("Name another one.", max_new_tokens=12)
    conv.rewind()
    assert [m["role"] for m in conv.messages] == ["user", "assistant"] and conv.messages[1]["content"] == first
    again = conv.send("Name another one.", max_new_tokens=12)
    assert again == smollm2.generate_text(conv.messages[:-1], chat=True, max_new_tokens=12)
    sampled = conv.send("And one more, surprise me.", do_sample=True, top_p=0.9, temperature=0.8, seed=3,
                        max_new_tokens=12)
    assert sampled == smollm2.generate_text(conv.messages[:-1], chat=True, do_sample=True, top_p=0.9, temperature=0.8,
                                            seed=3, max_new_tokens=12)
    conv.reset("Be brief.")
    assert conv.messages == [{"role": "system", "content": "Be brief."}]
    with pytest.raises(InputError, match="no turn"):
        conv.rewind()


@pytest.mark.real
def test_stop_strings_streaming_and_static_exports(smollm2, exported):
    conv = smollm2.conversation()
    chunks = []
    streamer = TextStreamer(smollm2.tokenizer, skip_prompt=True, on_text=lambda t, end: chunks.append(t),
                            skip_special_tokens=True)
    reply = conv.send("Count from 1 to 10.", streamer=streamer, stop_strings=["4"], max_new_tokens=40)
    assert "".join(chunks).strip() == reply.strip() and reply.rstrip().endswith("4") and "5" not in reply
    static = CausalLM.load(exported("smollm2-135m-instruct", static_max_length=160), threads=2)
    conv2 = static.conversation()
    for question in QUESTIONS[:2]:
        assert conv2.send(question, max_new_tokens=16) == smollm2.generate_text(
            conv2.messages[:-1], chat=True, max_new_tokens=16)


@pytest.mark.real
def test_context_limits(smollm2, exported):
    static = CausalLM.load(exported("smollm2-135m-instruct", static_max_length=160), threads=2)
    conv = static.conversation()
    with pytest.raises(InputError, match=r"holds \d+ tokens.*drop_oldest"):
        for question in QUESTIONS:
            conv.send(question, max_new_tokens=30)
    kept = conv.messages
    rolling = static.conversation(system="Be brief.", context_policy="drop_oldest")
    for question in QUESTIONS:
        rolling.send(question, max_new_tokens=30)
    msgs = rolling.messages
    assert msgs[0] == {"role": "system", "content": "Be brief."} and msgs[-2]["content"] == QUESTIONS[-1]
    assert len(msgs) < 1 + 2 * len(QUESTIONS) and [m["role"] for m in msgs[1:3]] == ["user", "assistant"]
    # the reply after dropping is what a stateless run on the kept history gives
    assert msgs[-1]["content"] == smollm2.generate_text(msgs[:-1], chat=True, max_new_tokens=30)
    assert kept[-1]["role"] == "assistant"  # the failed turn left the history as it was


@pytest.mark.real
def test_parallel_conversations_on_one_model(smollm2):
    questions = QUESTIONS[:3]
    expected = {}
    for i in range(3):
        conv = smollm2.conversation(system=f"You are assistant number {i}.")
        expected[i] = [conv.send(q, max_new_tokens=16) for q in questions]
    got, errors = {}, []

    def chat(i: int) -> None:
        try:
            conv = smollm2.conversation(system=f"You are assistant number {i}.")
            got[i] = [conv.send(q, max_new_tokens=16) for q in questions]
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == expected


def test_one_thread_at_a_time_and_bad_input(exported):
    lm = CausalLM.load(exported("tiny-llama"))
    if not lm.tokenizer.chat_template:
        with pytest.raises(UnsupportedError, match="chat template"):
            lm.conversation()
        lm.tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    conv = lm.conversation()
    assert isinstance(conv, Conversation)
    conv._busy.acquire()
    with pytest.raises(UnsupportedError, match="another thread"):
        conv.send("hi", max_new_tokens=2)
    conv._busy.release()
    with pytest.raises(InputError, match="string"):
        conv.send(42)
    with pytest.raises(InputError, match="role"):
        conv.messages = [{"role": "robot", "content": "x"}]
    with pytest.raises(Exception, match="context_policy"):
        lm.conversation(context_policy="forget")
    conv.send("hi", max_new_tokens=3, eos_token_id=None)
    assert len(conv.messages) == 2


# --- edgelm chat through a real pseudo-terminal ----------------------------------------------
class _Pty:
    """A child process whose controlling terminal is a pseudo-terminal (so Ctrl-C there is a real SIGINT)."""

    def __init__(self, args: list[str]):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "dumb"}
        self.pid, self.master = pty.fork()
        if self.pid == 0:  # the child: a new session whose controlling terminal is the pty
            os.execvpe(args[0], args, env)
        self.buffer = ""

    def read_until(self, marker: str, timeout: float = 120) -> str:
        end = time.time() + timeout
        while marker not in self.buffer:
            if time.time() > end:
                raise AssertionError(f"no {marker!r} in: {self.buffer[-2000:]!r}")
            ready, _, _ = select.select([self.master], [], [], 0.5)
            if ready:
                try:
                    self.buffer += os.read(self.master, 4096).decode("utf-8", "replace")
                except OSError:
                    break
        out, _, self.buffer = self.buffer.partition(marker)
        return out

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def wait(self, timeout: float = 60) -> int:
        end = time.time() + timeout
        while time.time() < end:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:  # keep the pty drained so the child never blocks on a full buffer
                if select.select([self.master], [], [], 0.2)[0]:
                    os.read(self.master, 4096)
            except OSError:
                time.sleep(0.2)
        os.kill(self.pid, 9)
        raise AssertionError("the chat did not exit")


@pytest.mark.real
def test_chat_command_in_a_pseudo_terminal(exported, tmp_path):
    folder = exported("smollm2-135m-instruct")
    term = _Pty([sys.executable, "-m", "edgelm.cli", "chat", str(folder), "--max-new-tokens", "24", "--threads", "2"])
    term.read_until("> ")
    term.send("What is the capital of France?\r")
    first = term.read_until("\n> ")
    assert "Paris" in first
    term.send("/stats\r")
    assert "tokens/s" in term.read_until("\n> ")
    term.send(f"/save {tmp_path / 'chat.json'}\r")
    term.read_until("\n> ")
    saved = json.loads((tmp_path / "chat.json").read_text())
    assert [m["role"] for m in saved] == ["user", "assistant"] and "Paris" in saved[1]["content"]
    term.send("/retry\r")
    assert "Paris" in term.read_until("\n> ")
    term.send("/system You answer in one word.\r")
    assert "system message set" in term.read_until("\n> ")
    term.send("/reset\r")
    term.read_until("\n> ")
    term.send(f"/load {tmp_path / 'chat.json'}\r")
    assert "loaded 2 messages" in term.read_until("\n> ")
    term.send("/help\r")
    assert "/retry" in term.read_until("\n> ")
    # Ctrl-C stops a long reply and keeps what it said; the chat goes on
    term.send("/exit\r")
    assert term.wait() == 0

    long = _Pty([sys.executable, "-m", "edgelm.cli", "chat", str(folder), "--max-new-tokens", "2000",
                 "--min-new-tokens", "2000", "--threads", "2"])
    long.read_until("> ")
    long.send("Write a very long story about a dragon.\r")
    long.read_until(" ", timeout=120)  # the reply has started
    time.sleep(1.0)
    long.send("\x03")
    stopped = long.read_until("\n> ", timeout=60)
    assert "[stopped after" in stopped and "Traceback" not in stopped
    long.send(f"/save {tmp_path / 'long.json'}\r")
    long.read_until("\n> ")
    msgs = json.loads((tmp_path / "long.json").read_text())
    assert msgs[-1]["role"] == "assistant" and 0 < len(msgs[-1]["content"])
    long.send("\x04")  # Ctrl-D quits
    assert long.wait() == 0
