"""Logits processors and warpers: small callables ``(input_ids, scores) -> scores`` over numpy.

Each mirrors the transformers class of the same name (4.55 semantics, same order of
application), so a user's settings mean the same thing here as there. ``input_ids`` is
(rows, length) int64 holding the prompt and what was generated so far; ``scores`` is
(rows, vocab) float32. Processors never modify their input in place.

The per-token cost matters on a device: the vocabulary-wide work is vectorised, and
top-k / top-p use ``argpartition`` to find the candidates before sorting only those.

Split by job: ``base`` (interface, softmax helpers), ``warpers`` (sampling distribution),
``constraints`` (penalties, bans, length rules), ``build`` (the list a config asks for).
"""

from edgelm.runtime.processors.base import (NEG_INF, LogitsProcessor, LogitsProcessorList, log_softmax,
                                            softmax)
from edgelm.runtime.processors.build import build_processors
from edgelm.runtime.processors.constraints import (
    RepetitionPenaltyLogitsProcessor, NoRepeatNGramLogitsProcessor, NoBadWordsLogitsProcessor,
    MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor, SuppressTokensLogitsProcessor,
    SuppressTokensAtBeginLogitsProcessor, ForcedBOSTokenLogitsProcessor, ForcedEOSTokenLogitsProcessor,
    ExponentialDecayLengthPenalty, LogitNormalization, HammingDiversityLogitsProcessor,
)
from edgelm.runtime.processors.warpers import (
    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper, TypicalLogitsWarper,
    EpsilonLogitsWarper, EtaLogitsWarper,
)

__all__ = [
    "NEG_INF", "LogitsProcessor", "LogitsProcessorList", "log_softmax", "softmax", "build_processors",
    "RepetitionPenaltyLogitsProcessor", "NoRepeatNGramLogitsProcessor", "NoBadWordsLogitsProcessor",
    "MinLengthLogitsProcessor", "MinNewTokensLengthLogitsProcessor", "SuppressTokensLogitsProcessor",
    "SuppressTokensAtBeginLogitsProcessor", "ForcedBOSTokenLogitsProcessor", "ForcedEOSTokenLogitsProcessor",
    "ExponentialDecayLengthPenalty", "LogitNormalization", "HammingDiversityLogitsProcessor",
    "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper",
    "TypicalLogitsWarper", "EpsilonLogitsWarper", "EtaLogitsWarper",
]
