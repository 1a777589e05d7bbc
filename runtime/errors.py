"""The user-facing error classes: every error edgediff raises on purpose derives from
:class:`EdgediffError`, which the CLI turns into one line and a non-zero exit. Anything
else is a bug and keeps its traceback. Standard-library bases are kept beside it
(``InvalidInput`` is also a ``ValueError``) so callers' ``except ValueError`` still works.
"""
from __future__ import annotations


class EdgediffError(Exception):
    """Base of every error edgediff raises about its input or environment."""


class InvalidInput(EdgediffError, ValueError):
    """An argument, option, config or file content that edgediff cannot use."""


class OutputExists(EdgediffError, FileExistsError):
    """An output path that is not edgediff's to replace."""


class MissingExtra(EdgediffError, ImportError):
    """An optional dependency is not installed; the message names the extra."""


# Optional top-level modules -> the extra that installs them.
EXTRAS = {"torch": "export", "onnxscript": "export", "diffusers": "export", "transformers": "export",
          "modelopt": "fp16", "onnxslim": "fp16", "onnx_graphsurgeon": "fp16", "polygraphy": "fp16",
          "tensorrt": "gpu-cu12 or gpu-cu13", "cuda": "gpu-cu12 or gpu-cu13", "onnxruntime": "cpu",
          "ray": "distributed", "sklearn": "test"}


def missing_extra(exc: ImportError) -> MissingExtra | None:
    """A one-line MissingExtra for an ImportError of an optional dependency, else None."""
    name = (getattr(exc, "name", None) or "").split(".")[0]
    if name not in EXTRAS:
        return None
    extras = " or ".join(f"'edgediff[{extra}]'" for extra in EXTRAS[name].split(" or "))    # alternatives
    return MissingExtra(f"this needs {name}, which is not installed: pip install {extras}")
