"""edgediff: diffusion denoisers from PyTorch to ONNX, FP16/INT8 and TensorRT, run torch-free.

The torch side lives in ``edgediff.export`` (imported on demand); ``edgediff.runtime`` runs
bundles with NumPy and ONNX Runtime/TensorRT only. The embedded API::

    from edgediff import Pipeline
    with Pipeline.from_bundle("build/digits-dit") as pipe:
        out = pipe(n=8, classes=[3], seed=0)
"""
__version__ = "0.1.0"

_LAZY = {"Pipeline": "pipeline", "Generation": "pipeline", "read_bundle": "bundle", "EdgediffError": "errors"}


def __getattr__(name):
    """Runtime names on demand, so ``import edgediff`` stays cheap and free of cycles."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"edgediff.runtime.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'edgediff' has no attribute {name!r}")


__all__ = ["EdgediffError", "Generation", "Pipeline", "__version__", "read_bundle"]
