"""One decoding step: token ids + positions + cache -> logits (and hidden state), cache advanced."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgelm.runtime.errors import InputError, ModelLoadError, UnsupportedError
from edgelm.runtime.kv_cache import KVCache, SharedKVCache, StaticKVCache
from edgelm.runtime.manifest import Manifest, draft_token_ids
from edgelm.runtime.session import ProviderSpec, create_session

GREEDY_HEAD, GREEDY_IDS, GREEDY_LOGITS = "greedy_head", "greedy_ids", "greedy_logits"
"""The greedy head's input and outputs (``edgelm.export.greedy_head``; the runtime never imports the exporter)."""


def greedy_picks(ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """The greedy head's token for each row of ``logits`` (..., n) over its candidates ``ids`` (n,): the lowest id
    among the highest logits, which is what argmax over the whole vocabulary picks (``ids`` may repeat a token and
    are not sorted across rows, so the position of the maximum alone would not do)."""
    top = logits == logits.max(axis=-1, keepdims=True)
    return np.where(top, ids, np.iinfo(np.int64).max).min(axis=-1)


class ReusedOutputs:
    """Output arrays one decoding loop hands to onnxruntime again at every pass, for outputs it reads before the
    next pass (greedy search's argmax): onnxruntime writes into them, so a step allocates and copies nothing.

    Why: a step's logits are 49,152 float32 for SmolLM2; left to onnxruntime, each pass allocates them,
    ``numpy()`` copies them out, and collecting the outputs makes 62 Python objects. With the leaner bans
    and stopping criteria of the same change, this took ``generate``'s time outside onnxruntime from 0.14
    to 0.08 ms of a 3.6 ms int4 SmolLM2 step (``benchmarks/loop_overhead.py``, before and after). A loop
    that keeps the logits it is given (scores, ``output_logits``) must not pass these: the next pass
    overwrites them. One per generation, like the cache (the Decoder itself stays stateless).
    """

    def __init__(self) -> None:
        self._values: dict[str, tuple[np.ndarray, object]] = {}

    def value(self, name: str, shape: tuple[int, ...]) -> tuple[np.ndarray, object]:
        """The float32 array for output ``name`` at ``shape`` and the C-level OrtValue wrapping it (made anew when
        the shape changes: onnxruntime writes into a bound output only if its shape is the one computed)."""
        pair = self._values.get(name)
        if pair is None or pair[0].shape != shape:
            array = np.empty(shape, np.float32)
            pair = self._values[name] = (array, ort.OrtValue.ortvalue_from_numpy(array)._ortvalue)
        return pair


class Decoder:
    """Owns the causal LM's session and knows its inputs and outputs by name.

    Inputs are fed by name (GPT-2 and Llama graphs order them differently). The object keeps
    no per-generation state, so one Decoder serves several threads at once: each call gets
    its own IOBinding and its own cache.
    """

    def __init__(self, model_dir: Path, manifest: Manifest, provider: ProviderSpec = "cpu",
                 threads: int | None = None, optimization: str = "all", model_file: str | None = None,
                 load_cache: bool | str | None = None, stable_rows: bool = False):
        self.manifest = manifest
        self.model_file = model_file or manifest.model_file
        self.session = create_session(Path(model_dir) / self.model_file, provider, threads, optimization,
                                      use_cache=load_cache)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        required = {"input_ids", "attention_mask", "logits"}
        missing = required - set(self.input_names) - set(self.output_names)
        if missing:
            raise ModelLoadError(f"{self.model_file} lacks {', '.join(sorted(missing))}: it is not a causal LM graph")
        self.past_names = [n for n in self.input_names if n.startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        absent = [n for n in self.present_names if n not in self.output_names]
        if absent or not self.past_names:
            raise ModelLoadError(
                f"{self.model_file} has no KV cache inputs/outputs in optimum's naming (missing {absent[:2] or 'past_key_values.*'}); "
                "export it with `edgelm export`"
            )
        if manifest.num_layers and len(self.past_names) != 2 * manifest.num_layers:
            raise ModelLoadError(
                f"the manifest says {manifest.num_layers} layers but the graph has {len(self.past_names) // 2}; "
                "the folder mixes files of different exports: re-export it"
            )
        past = next(i for i in self.session.get_inputs() if i.name == self.past_names[0])
        self.num_kv_heads = manifest.num_key_value_heads or int(past.shape[1])
        self.head_dim = manifest.head_dim or int(past.shape[3])
        for dim, want, what in ((past.shape[1], self.num_kv_heads, "KV heads"), (past.shape[3], self.head_dim, "head size")):
            if isinstance(dim, int) and dim != want:
                raise ModelLoadError(f"the manifest's {what} ({want}) disagrees with the graph ({dim}); re-export the model")
        self.has_position_ids = "position_ids" in self.input_names
        self.keeps_logits = any(i.name == "logits_to_keep" for i in self.session.get_overridable_initializers())
        """The graph can compute the LM head for the last k positions only (edgelm exports since it was
        added; see ``export.graph.add_logits_to_keep``); others always return every position's logits."""
        self._int_values: dict[int, tuple[np.ndarray, object]] = {}
        self.greedy_head = GREEDY_HEAD in {i.name for i in self.session.get_overridable_initializers()} \
            and {GREEDY_IDS, GREEDY_LOGITS} <= set(self.output_names)
        """The graph can give greedy search's next token without its float32 LM head (``export.greedy_head``,
        float32 exports since it was added); ``greedy_tokens`` uses it."""
        self.static = False
        self.one_row_chunks = manifest.attention == "GroupQueryAttention"
        self.shared_buffer = self.one_row_chunks and os.environ.get("EDGELM_KV_SHARED_BUFFER", "1") != "0"
        """Fused graphs run with past and present in one buffer (SharedKVCache); EDGELM_KV_SHARED_BUFFER=0 turns
        it off (the graph is the same either way), e.g. to compare the two in a benchmark."""
        self.has_hidden = "last_hidden_state" in self.output_names
        if stable_rows and not self.one_row_chunks:
            raise UnsupportedError(
                "stable_rows needs attention fused into GroupQueryAttention, which `edgelm export` writes for "
                f"Llama-family models unless --no-fuse; {self.model_file} keeps attention as plain ONNX ops: "
                "re-export it without --no-fuse, or load it without stable_rows")
        elif stable_rows and not self.shared_buffer:
            raise UnsupportedError(
                "stable_rows drops each step's second row from the cache, which is free only when past and present "
                "share one buffer, and EDGELM_KV_SHARED_BUFFER=0 turned that off (every step would copy the whole "
                "cache): unset it, or load without stable_rows")
        self.stable_rows = stable_rows
        """Feed every one-token pass of a single sequence as two rows (see ``_step_two_rows``)."""
        self._slots = manifest.max_position_embeddings or 2**62
        """Cache slots the graph's rotary tables cover: the second row needs one more than its token."""
        self.providers = self.session.get_providers()
        self.device = "cuda" if self.providers and self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self._cpu = ort.OrtDevice.make("cpu", 0)._get_c_device()
        self._cache_device = ort.OrtDevice.make(self.device, 0)._get_c_device()
        self.token_ids = draft_token_ids(manifest)
        """The token of each logits column for a draft folder (``edgelm draft``), None when logits cover the vocabulary."""
        outputs = {o.name: o for o in self.session.get_outputs()}
        vocab_dim = outputs["logits"].shape[-1]
        columns = len(self.token_ids) if self.token_ids is not None else manifest.vocab_size
        if isinstance(vocab_dim, int) and columns and vocab_dim != columns:
            raise ModelLoadError(
                f"the manifest says the logits have {columns} columns but the graph's have {vocab_dim}; re-export")
        self.columns = columns or (vocab_dim if isinstance(vocab_dim, int) else None)
        """Width of a logits row (None where neither the manifest nor the graph says)."""
        hidden = outputs.get("last_hidden_state")
        hidden_dim = hidden.shape[-1] if hidden is not None else None
        self.hidden_size = hidden_dim if isinstance(hidden_dim, int) else (manifest.hidden_size or None)
        self.reusable = (self.device == "cpu" and bool(self.columns) and outputs["logits"].type == "tensor(float)"
                         and (hidden is None or (bool(self.hidden_size) and hidden.type == "tensor(float)")))
        """A loop's ``ReusedOutputs`` can take this graph's logits and hidden state: float32 on the CPU, of known
        widths."""

    def new_cache(self, batch: int, capacity: int = 256) -> KVCache | SharedKVCache:
        """An empty cache; fused (GroupQueryAttention) graphs get one buffer per layer written in place."""
        if self.shared_buffer:
            return SharedKVCache.empty(self.past_names, self.present_names, batch, self.num_kv_heads, self.head_dim,
                                       capacity, self.device)
        return KVCache.empty(self.past_names, batch, self.num_kv_heads, self.head_dim, device=self.device)

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: KVCache,
             want_hidden: bool = False, keep: int = 0,
             reuse: ReusedOutputs | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Run ``input_ids`` (batch, new) on top of ``cache``; returns logits and the hidden state (batch, new, hidden).

        The logits are (batch, new, vocab), or (batch, keep, vocab) for the last ``keep`` positions when
        ``keep`` > 0: a prefill that only needs the next token asks for 1 and skips the LM head for
        the rest of the prompt, as transformers' ``logits_to_keep`` does. ``reuse``: where the graph can, the
        logits come back in its arrays, valid until the next pass given it (``ReusedOutputs``).
        """
        if want_hidden and not self.has_hidden:
            raise UnsupportedError(
                "this model's graph has no last_hidden_state output (an optimum export?); contrastive search needs "
                "it: re-export the model with `edgelm export`"
            )
        new = input_ids.shape[1]
        if self.stable_rows and new == 1 and input_ids.shape[0] == 1 and cache.length + 2 <= self._slots:
            return self._step_two_rows(input_ids, attention_mask, position_ids, cache, want_hidden)
        if self.one_row_chunks and new > 1 and input_ids.shape[0] > 1 and cache.length > 0:
            # GroupQueryAttention takes several tokens on a past for one row only: feed them one by one.
            total = attention_mask.shape[1]
            outs = [self.step(input_ids[:, t: t + 1], attention_mask[:, : total - new + t + 1], position_ids[:, t: t + 1],
                              cache, want_hidden) for t in range(new)]
            logits = np.concatenate([o[0] for o in outs], axis=1)
            hidden = np.concatenate([o[1] for o in outs], axis=1) if want_hidden else None
        else:
            feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
            if self.has_position_ids:
                feeds["position_ids"] = position_ids
            # Fed every step when the graph has it: a kept binding would otherwise hold the last call's value.
            logits, hidden = self._run(feeds, cache, want_hidden, new, keep if self.keeps_logits else None,
                                       reuse=reuse)
        return (logits[:, -keep:] if keep else logits), hidden  # a no-op view when the graph already kept them

    def greedy_tokens(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                      cache: KVCache, reuse: ReusedOutputs | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Run ``input_ids`` on top of ``cache`` like ``step``; returns the argmax of the last position's logits per
        row, and those logits (rows, vocab) where the pass computed them (None through the greedy head).

        Through the graph's greedy head when it has one: the candidates it returns always hold the exact
        argmax (``export.greedy_head``), so this is the full head's token without reading the float32 head.
        Elsewhere (no head, ``stable_rows``, several tokens of several rows on a fused graph) it is the
        full logits' argmax. A hidden state with no finite candidate (a broken model) reruns the pass with
        the full head, so it fails or succeeds as ``step`` would.

        ``reuse``: the logits come back in its arrays (``ReusedOutputs``), valid until the next pass that is
        given it; where the full logits' argmax is taken.
        """
        new, length = input_ids.shape[1], cache.length
        if self.greedy_head and not self.stable_rows and not (
                self.one_row_chunks and new > 1 and input_ids.shape[0] > 1 and length > 0):
            feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
            if self.has_position_ids:
                feeds["position_ids"] = position_ids
            _, _, (ids, logits) = self._run(feeds, cache, False, new, 1 if self.keeps_logits else None, greedy=True)
            if ids.size:
                return greedy_picks(ids, logits[:, -1, :]), None
            cache.crop(length)
        logits = self.step(input_ids, attention_mask, position_ids, cache, keep=1, reuse=reuse)[0][:, -1, :]
        return np.argmax(logits, axis=-1), logits

    def _step_two_rows(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache,
                       want_hidden: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """A one-token pass fed as that token twice, the second row dropped: every pass then holds two rows
        or more, and a token's logits no longer depend on how many tokens its pass holds.

        onnxruntime multiplies a single row by a non-constant matrix (GroupQueryAttention's probabilities x
        V) with a kernel of its own whose sums run in another order; from two rows on, every row comes out
        the same whatever the row count (``benchmarks/verify_rows.py`` shows both). A last-bit difference
        stays a last-bit difference in float32, but a graph that quantizes its activations to int8 can
        round it to the next step and carry that to the logits (~0.2 on Qwen2.5-Coder), so a speculative
        verify pass (several rows) and a greedy step (one) could pick differently at a near-tie. The
        second row is causal garbage that row 0 never attends to; its cache slot is cropped and
        overwritten by the next token. Costs one extra row per step (MatMulNBits streams the weights once
        for both). A token in the model's last position is fed alone: GroupQueryAttention takes rotary
        positions from cache slots and has no table row for one past the end (``generate`` never feeds
        that position: the token after it could not be fed).
        """
        ids = np.concatenate([input_ids, input_ids], axis=1)
        mask = np.concatenate([attention_mask, attention_mask[:, -1:]], axis=1)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if self.has_position_ids:  # kept for the I/O contract: fused graphs take rotary positions from slots
            feeds["position_ids"] = np.concatenate([position_ids, position_ids], axis=1)
        logits, hidden = self._run(feeds, cache, want_hidden, 2, 2 if self.keeps_logits else None)
        cache.crop(cache.length - 1)
        return logits[:, :1], (hidden[:, :1] if hidden is not None else None)

    def _int_value(self, value: int):
        """An int64 [1] input (``logits_to_keep``, ``greedy_head``) as a C-level OrtValue, made once per value."""
        pair = self._int_values.get(value)
        if pair is None:  # the OrtValue wraps the array's memory, so both are kept; a race makes an equal pair twice
            array = np.array([value], np.int64)
            pair = self._int_values[value] = (array, ort.OrtValue.ortvalue_from_numpy(array)._ortvalue)
        return pair[1]

    def _run(self, feeds: dict[str, np.ndarray], cache, want_hidden: bool, new: int,
             keep: int | None = None, greedy: bool = False, reuse: ReusedOutputs | None = None) -> tuple:
        """One session run through the C-level IOBinding (see kv_cache's docstring for why); the cache binds
        its own past and presents and takes the outputs back.

        A cache may keep its binding from step to step with its buffers still bound (``SharedKVCache``,
        ``kept``): inputs and the logits are rebound by name, which replaces them in place,
        so the outputs keep the order of the first binding: logits, the hidden state, the greedy head's
        candidates, the presents. Such a binding always returns the hidden state and the candidates (the
        graph computes both anyway; the candidates are empty unless ``greedy``), so that no place moves.

        With ``reuse`` (and neither ``greedy`` nor ``want_hidden``), a CPU graph whose output shapes are known
        writes its logits and hidden state into ``reuse``'s arrays, and a cache that keeps its binding and
        writes in place needs nothing back either, so no output is collected.

        Returns (logits, hidden state or None); with ``greedy`` (a graph with the greedy head), (empty logits,
        None, (candidate ids, their logits)).
        """
        binding, kept = cache.binding(self.session)
        raw = binding._iobinding
        # The bound values wrap these arrays' memory: they must stay referenced until the run is over.
        arrays = {name: np.ascontiguousarray(value, dtype=np.int64) for name, value in feeds.items()}
        for name, value in arrays.items():
            raw.bind_input(name, value)
        if keep is not None:  # an input with a default (an initializer): bindable only as an OrtValue
            raw.bind_ortvalue_input("logits_to_keep", self._int_value(keep))
        with_hidden = want_hidden or (self.has_hidden and kept)
        reusing = reuse is not None and kept and not greedy and not want_hidden and self.reusable
        if reusing:
            batch = feeds["input_ids"].shape[0]
            logits, value = reuse.value("logits", (batch, keep or new, self.columns))
            raw.bind_ortvalue_output("logits", value)
            if with_hidden:  # bound by a kept binding whether read or not (above)
                raw.bind_ortvalue_output("last_hidden_state",
                                         reuse.value("last_hidden_state", (batch, new, self.hidden_size))[1])
        else:
            raw.bind_output("logits", self._cpu)
            if with_hidden:
                raw.bind_output("last_hidden_state", self._cpu)
        if self.greedy_head:  # fed every run, like the inputs above: a kept binding would hold the last value
            raw.bind_ortvalue_input(GREEDY_HEAD, self._int_value(int(greedy)))
            raw.bind_output(GREEDY_IDS, self._cpu)
            raw.bind_output(GREEDY_LOGITS, self._cpu)
        cache.bind(binding, self.present_names, self._cache_device, new)
        self.session.run_with_iobinding(binding)
        if reusing:
            cache.adopt(None, 0, new)
            return logits, None
        outs = raw.get_outputs()
        first = 1 + with_hidden
        cache.adopt(outs, first + 2 * self.greedy_head, new)
        if greedy:
            return outs[0].numpy(), None, (outs[first].numpy(), outs[first + 1].numpy())
        return outs[0].numpy(), (outs[1].numpy() if want_hidden else None)


class StaticDecoder(Decoder):
    """Drives a static-shape export (``edgelm export --static-shapes``): one token per call into a fixed buffer.

    It keeps ``Decoder.step``'s contract (any number of new tokens, logits for each), so the
    strategies cannot tell the difference; a chunk of n tokens costs n calls.
    """

    def __init__(self, model_dir: Path, manifest: Manifest, provider: ProviderSpec = "cpu",
                 threads: int | None = None, optimization: str = "all", model_file: str | None = None,
                 load_cache: bool | str | None = None, stable_rows: bool = False):
        # One token per pass always: every row is computed alike already, so ``stable_rows`` changes nothing.
        super().__init__(model_dir, manifest, provider, threads, optimization, model_file, load_cache)
        self.static = True
        self.capacity = int(manifest.static_max_length)
        self.static_batch = int(manifest.static_batch or 1)
        mask = next(i for i in self.session.get_inputs() if i.name == "attention_mask")
        if "cache_position" not in self.input_names or mask.shape[1] != self.capacity:
            raise ModelLoadError(
                f"the manifest says a static cache of {self.capacity} but the graph's attention_mask is {mask.shape}; "
                "the folder mixes files of different exports: re-export it")

    def new_cache(self, batch: int, capacity: int | None = None) -> StaticKVCache:
        """The exported buffer; ``capacity`` is fixed by the export, so the argument is ignored."""
        if batch != self.static_batch:
            raise UnsupportedError(
                f"this static-shape model was exported for batch {self.static_batch}, not {batch} (beam search, "
                "several prompts or num_return_sequences > 1 need the dynamic export)")
        return StaticKVCache(self.past_names, batch, self.num_kv_heads, self.head_dim, self.capacity)

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: StaticKVCache,
             want_hidden: bool = False, keep: int = 0,
             reuse: ReusedOutputs | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """``Decoder.step``; ``reuse`` is not taken: the static cache's binding is new every call (its presents come
        back as outputs), and the logits of a chunk are joined from one call per token anyway."""
        new = input_ids.shape[1]
        if cache.length + new > self.capacity:
            raise InputError(
                f"{cache.length + new} tokens exceed this static-shape model's cache of {self.capacity}; shorten the "
                f"prompt, lower max_new_tokens, or re-export with a larger --max-length")
        logits, hidden = [], []
        for t in range(new):
            slot = cache.length
            cache.mask[:, slot] = attention_mask[:, slot]
            feeds = {"input_ids": input_ids[:, t: t + 1], "attention_mask": cache.mask,
                     "position_ids": position_ids[:, t: t + 1], "cache_position": np.array([slot])}
            step_logits, step_hidden = self._run(feeds, cache, want_hidden, 1)
            logits.append(step_logits)
            if want_hidden:
                hidden.append(step_hidden)
        logits = logits[-keep:] if keep else logits
        return np.concatenate(logits, axis=1), (np.concatenate(hidden, axis=1) if want_hidden else None)
