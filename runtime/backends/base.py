"""The backend contract: ``infer(feed: dict[str, ndarray]) -> dict[str, ndarray]``."""
from __future__ import annotations

import numpy as np


class BackendError(RuntimeError):
    """A backend that cannot be created or fed."""


def validate_feed(feed: dict[str, np.ndarray], inputs: dict[str, dict]) -> int:
    """Check a feed against the bundle's declared inputs; return the batch size."""
    missing = sorted(set(inputs) - set(feed))
    extra = sorted(set(feed) - set(inputs))
    if missing or extra:
        raise BackendError(f"feed mismatch: missing {missing or 'none'}, unexpected {extra or 'none'}")
    batch = None
    for name, decl in inputs.items():
        arr = feed[name]
        if not isinstance(arr, np.ndarray) or arr.dtype != np.dtype(decl["dtype"]):
            got = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
            raise BackendError(f"input {name!r} must be a {decl['dtype']} ndarray, got {got}")
        shape = decl["shape"]
        if arr.ndim != len(shape) or any(isinstance(d, int) and d != s for d, s in zip(shape, arr.shape)):
            raise BackendError(f"input {name!r} has shape {arr.shape}, expected {shape}")
        if batch is not None and arr.shape[0] != batch:
            raise BackendError(f"input {name!r} has batch {arr.shape[0]}, others have {batch}")
        batch = arr.shape[0]
    return batch or 0
