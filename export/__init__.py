"""edgelm's exporter: transformers checkpoints and GGUF files to validated ONNX folders.

Needs the heavy dependencies of the ``export`` extra (``pip install 'edgelm[export]'``).
"""

from edgelm.export.api import export_model

__all__ = ["export_model"]
