"""INT8 Q/DQ models on ONNX Runtime's CPU provider: unsigned activations, exactly.

The bundle's INT8 model is written for TensorRT's explicit quantization: activations are
symmetric INT8 (zero point 0). ONNX Runtime's x86 kernels (QLinearConv, QLinearMatMul, the
VNNI GEMMs) take *unsigned* activations with signed weights, so ORT converts each S8 Q->DQ
pair to U8 at load — but only a pair whose Q feeds exactly one DQ with one consumer. In a
U-Net most activations feed several layers (GroupNorm, the residual Add, the skip Concat):
those pairs stay S8, their convolutions stay DequantizeLinear -> FP32 Conv, and the S8 and
U8 halves no longer fuse (measured, ddpm-cifar10-32 batch 8: 17 of 65 convolutions left in
FP32 and 370 DequantizeLinear nodes; 330 ms of kernels against 206 ms after this rewrite).

The rewrite is exact: with zero point 0, S8 quantization clamps round(x / s) to [-128, 127];
U8 with zero point 128 stores the same integer plus 128 and dequantizes to the same value.
Weights (Q of an initializer) stay S8, as the kernels want them.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..interrupts import deferred

_U8_ZERO = 128


def unsigned_activations(model) -> int:
    """Rewrite every activation QuantizeLinear with a scalar INT8 zero point of 0 (and the
    DequantizeLinear nodes reading it) to UINT8 with zero point 128, in place; the count."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    added, count = [], 0
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits or len(node.input) < 3:
            continue
        zero = inits.get(node.input[2])
        if zero is None or zero.data_type != onnx.TensorProto.INT8 or numpy_helper.to_array(zero).size != 1 \
                or numpy_helper.to_array(zero).item() != 0:
            continue
        dqs = readers.get(node.output[0], [])
        if not all(d.op_type == "DequantizeLinear" for d in dqs):
            continue    # a Q read by anything but a DQ keeps its type: nothing else may change under it
        name = f"{node.output[0]}__u8_zero_point"
        added.append(numpy_helper.from_array(np.full(numpy_helper.to_array(zero).shape, _U8_ZERO, np.uint8), name))
        for n in [node, *dqs]:
            n.input[2] = name
        count += 1
    graph.initializer.extend(added)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    dropped = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and i.name not in used]
    for init in dropped:      # the S8 zero points left unread (ORT would log a line for each)
        graph.initializer.remove(init)
    return count


class CpuInt8Model:
    """The source ONNX Runtime loads for an INT8 model on the CPU: serialized bytes of the
    rewritten model, or (a model with external weights, which protobuf cannot hold past 2 GB)
    a private temporary copy, removed by :meth:`close` (ONNX Runtime may map its weights)."""

    def __init__(self, path: Path):
        import onnx
        from onnx.external_data_helper import uses_external_data

        model = onnx.load(str(path), load_external_data=False)
        external = any(uses_external_data(t) for t in model.graph.initializer)
        if external:
            model = onnx.load(str(path))
        self.rewritten = unsigned_activations(model)
        self._dir = None
        if not external:
            self.source = model.SerializeToString()
            return
        try:
            with deferred():
                self._dir = tempfile.mkdtemp(prefix="edgediff-int8-")
            target = Path(self._dir) / path.name
            onnx.save(model, str(target), save_as_external_data=True, location=f"{path.name}.data")
        except BaseException:
            self.close()
            raise
        self.source = str(target)

    def loaded(self) -> None:
        """The session holds its own copy: drop the serialized bytes (the model's size)."""
        if isinstance(self.source, bytes):
            self.source = None

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
