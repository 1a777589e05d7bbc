"""Backends: ``infer(dict[str, ndarray]) -> dict[str, ndarray]`` over a bundle's model.

One module per backend, each defining a :class:`~.base.Backend` subclass; heavy
dependencies are imported inside the backend's module only when that backend is chosen.
"""
from __future__ import annotations

import importlib

from .base import Backend, BackendError, RunOptions, validate_feed

# name -> (module, class); one line per backend.
BACKENDS = {
    "ort": ("ort", "OrtBackend"),
    "trt": ("trt", "TrtBackend"),
}


def backend_class(name: str) -> type[Backend]:
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def load_backend(bundle, name: str = "ort", precision: str = "fp32", **options) -> Backend:
    """Create backend ``name`` for ``bundle``'s model of ``precision``; ``options`` are
    :class:`RunOptions` fields (each backend uses the ones it understands)."""
    return backend_class(name).from_bundle(bundle, precision, RunOptions(**options))


__all__ = ["BACKENDS", "Backend", "BackendError", "RunOptions", "backend_class", "load_backend", "validate_feed"]
