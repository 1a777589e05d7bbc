"""Backends: ``infer(dict[str, ndarray]) -> dict[str, ndarray]`` over a bundle's model.

One module per backend; heavy dependencies are imported inside the backend's module only
when that backend is chosen.
"""
from __future__ import annotations

import importlib

from .base import BackendError, validate_feed

# name -> (module, factory function); one line per backend.
BACKENDS = {
    "ort": ("ort", "from_bundle"),
    "trt": ("trt", "from_bundle"),
}


def load_backend(bundle, name: str = "ort", precision: str = "fp32", **options):
    """Create backend ``name`` for ``bundle``'s model of ``precision``."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    module, factory = BACKENDS[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), factory)(bundle, precision, **options)


__all__ = ["BACKENDS", "BackendError", "load_backend", "validate_feed"]
