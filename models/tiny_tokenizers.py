"""Small, deterministic tokenizers for the tiny random models.

Tiny models need a real tokenizer (a ``tokenizer.json`` with merges, special tokens, a
post-processor) so that tests go through the same code paths as real checkpoints, but
shipping one from the hub is impossible here. Training a few-hundred-token vocabulary on
a fixed corpus with the ``tokenizers`` trainers takes well under a second and gives the
same vocabulary on every machine.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

CORPUS = """
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Edge devices run language models with ONNX Runtime: phones, laptops and small boards alike.
Once upon a time there was a little robot who wanted to learn how to write poems about the sea.
The capital of France is Paris. The capital of Japan is Tokyo. The capital of Italy is Rome.
def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024. Punctuation, quotes "like this" and 'that'; colons: yes!
Caf\u00e9, na\u00efve, r\u00e9sum\u00e9, \u00fcber, se\u00f1or. \u4f60\u597d\u4e16\u754c. \u3053\u3093\u306b\u3061\u306f. \U0001F600 \U0001F680
Machine learning models predict the next token given the previous tokens in the sequence.
Beam search keeps several hypotheses; sampling draws from the distribution; greedy takes the best.
The weather today is sunny with a light breeze from the west, and tomorrow it may rain.
She sells sea shells by the sea shore. Peter Piper picked a peck of pickled peppers.
""".strip()

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus_lines() -> list[str]:
    return CORPUS.splitlines() * 3


def byte_level_bpe(vocab_size: int, special_tokens: list[str]) -> Tokenizer:
    """A GPT-2 style byte-level BPE tokenizer (every byte is representable: no unknown token)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    return tok


def wordpiece(vocab_size: int) -> Tokenizer:
    """A BERT style lower-casing WordPiece tokenizer with [CLS] ... [SEP] framing."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return tok


def roberta_bpe(vocab_size: int) -> Tokenizer:
    """A RoBERTa style byte-level BPE tokenizer with <s> ... </s> framing and a <mask> token."""
    tok = byte_level_bpe(vocab_size, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")))
    return tok
