"""The backend contract: ``infer(feed: dict[str, ndarray]) -> dict[str, ndarray]``.

:class:`Backend` validates every feed against the bundle's declared inputs, calls the
backend's own :meth:`Backend.infer_impl`, renames legacy output names and checks that every
output is finite. Backends are context managers; ``close()`` frees what they hold.
A backend maps the run options it understands (:class:`RunOptions`) in its own
``from_bundle``; adding one is a module with a ``Backend`` subclass plus one registry line
in ``backends/__init__.py``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import EdgediffError


class BackendError(EdgediffError, RuntimeError):
    """A backend that cannot be created or fed, or a model that computed non-finite values."""


class NonFiniteOutput(BackendError):
    """A model output holds NaN/inf (``output``: its name)."""

    def __init__(self, output: str, bad: int, size: int):
        super().__init__(f"the model produced non-finite values (NaN/inf) in {output!r} ({bad} of {size}): "
                         "check the weights, or use a higher precision")
        self.output, self.bad, self.size = output, bad, size


@dataclass(frozen=True)
class RunOptions:
    """Everything a caller may say about where and how to run; each backend takes its part."""

    device: str = "cpu"             # ONNX Runtime execution provider: cpu | cuda | tensorrt
    threads: int | None = None      # CPU intra-op threads (None: all cores)
    gpu: int = 0                    # CUDA device index
    max_batch: int | None = None    # the largest batch the caller will feed (engine profile choice)
    cuda_graph: bool = False        # TensorRT: capture CUDA graphs per batch size
    component: str = "denoiser"     # which model of the bundle: denoiser, decoder, encoder


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


class Backend:
    """Base of every backend: one validation, one output check, one lifecycle."""

    name = "base"
    check_finite = True       # refuse NaN/inf outputs (generate --allow-nonfinite turns it off)

    def __init__(self, inputs: dict[str, dict], outputs: list[str], graph_outputs: dict | None = None):
        self.inputs = inputs
        self.outputs = list(outputs)
        # edgediff output name -> the graph's name (schema-1 bundles call DiT's `var` `v`)
        self.graph_names = [(graph_outputs or {}).get(n, n) for n in self.outputs]

    @classmethod
    def from_bundle(cls, bundle, precision: str, options: RunOptions) -> "Backend":
        raise NotImplementedError

    def infer_impl(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the model on a validated feed; return outputs in ``self.graph_names`` order."""
        raise NotImplementedError

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = validate_feed(feed, self.inputs)
        out = dict(zip(self.outputs, self.infer_impl(feed)))
        for name, arr in out.items():
            if arr.shape[:1] != (batch,):
                raise BackendError(f"output {name!r} has shape {arr.shape} for a batch of {batch}")
            if self.check_finite and not np.isfinite(arr).all():
                raise NonFiniteOutput(name, int(arr.size - np.count_nonzero(np.isfinite(arr))), arr.size)
        return out

    def close(self) -> None:
        """Free sessions, buffers and streams; the base holds nothing."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
