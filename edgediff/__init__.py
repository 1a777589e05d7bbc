"""edgediff: diffusion denoisers from PyTorch to ONNX, FP16/INT8 and TensorRT, run torch-free.

The torch side lives in ``edgediff.export`` (imported on demand); ``edgediff.runtime`` runs
bundles with NumPy and ONNX Runtime/TensorRT only.
"""
__version__ = "0.1.0"
