"""The exception types edgelm raises on bad input.

Every error a user can cause is one of these, so callers (and the CLI) can catch
``EdgeLMError`` and print a one-line message instead of a traceback. The subclasses
also inherit from the builtin a Python user would expect (``ValueError``,
``FileNotFoundError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class EdgeLMError(Exception):
    """Base of every error edgelm raises on purpose."""


class ModelLoadError(EdgeLMError, OSError):
    """A model folder or file is missing, corrupt, or does not match its manifest."""


class GenerationConfigError(EdgeLMError, ValueError):
    """Generation settings that are unknown, out of range or contradict each other."""


class InputError(EdgeLMError, ValueError):
    """Token ids, prompts or texts that the model cannot take (wrong shape, too long, ...)."""


class UnsupportedError(EdgeLMError, NotImplementedError):
    """A feature that this model folder or this build cannot provide."""


class ProviderError(EdgeLMError, ValueError):
    """An execution provider name or option that onnxruntime does not know."""


class ExportError(EdgeLMError, RuntimeError):
    """An export that cannot start or did not validate."""
