"""INT8 Q/DQ models on ONNX Runtime's CPU provider: unsigned activations, exactly.

The bundle's INT8 model is written for TensorRT's explicit quantization: activations are
symmetric INT8 (zero point 0). ONNX Runtime's x86 kernels (QLinearConv, QLinearMatMul, the
VNNI GEMMs) take *unsigned* activations with signed weights, so ORT converts each S8 Q->DQ
pair to U8 at load — but only a pair whose Q feeds exactly one DQ with one consumer. In a
U-Net most activations feed several layers (GroupNorm, the residual Add, the skip Concat):
those pairs stay S8, their convolutions stay DequantizeLinear -> FP32 Conv, and the S8 and
U8 halves no longer fuse (measured, ddpm-cifar10-32 batch 8: 17 of 65 convolutions left in
FP32 and 370 DequantizeLinear nodes; 330 ms of kernels against 206 ms after this rewrite).

The rewrite is exact at the Q/DQ level: with zero point 0, S8 quantization clamps
round(x / s) to [-128, 127]; U8 with zero point 128 stores the same integer plus 128 and
dequantizes to the same value. Weights (Q of an initializer) stay S8, as the kernels want
them. (What the fused kernels then compute is ORT's U8 x S8 arithmetic, the same ORT applies
to the pairs it converts itself; on CPUs without VNNI its AVX2 kernels may saturate 16-bit
pair sums — the INT8 gate is measured on the machine that converts.)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

_U8_ZERO = 128
_EXTERNAL_FOLDER = "session.model_external_initializers_file_folder_path"


def all_nodes(graph):
    """Nodes of ``graph`` and of its subgraphs (If/Loop bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g and attr.g.node:
                yield from all_nodes(attr.g)


def _zero_of(name: str, inits: dict, base_dir: str) -> bool:
    """Is ``name`` a scalar INT8 initializer holding 0?"""
    import onnx
    from onnx import numpy_helper

    init = inits.get(name)
    if init is None or init.data_type != onnx.TensorProto.INT8:
        return False
    value = numpy_helper.to_array(init, base_dir=base_dir)
    return value.size == 1 and value.item() == 0


def unsigned_activations(model, base_dir: str = "") -> int:
    """Rewrite every activation QuantizeLinear with a scalar INT8 zero point of 0 (and the
    DequantizeLinear nodes reading it) to UINT8 with zero point 128, in place; the count.
    Left alone: a Q read by anything but such a DQ, read inside a subgraph, or a graph output."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    nested = {name for node in graph.node for attr in node.attribute if attr.g
              for inner in all_nodes(attr.g) for name in inner.input}
    fixed = {o.name for o in graph.output} | nested
    added, rewritten = [], set()
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits or len(node.input) < 3 \
                or node.output[0] in fixed or not _zero_of(node.input[2], inits, base_dir):
            continue
        dqs = readers.get(node.output[0], [])
        if not all(d.op_type == "DequantizeLinear" and len(d.input) == 3 and _zero_of(d.input[2], inits, base_dir)
                   for d in dqs):
            continue    # anything else reading the INT8 tensor would see its type change under it
        name = f"{node.output[0]}__u8_zero_point"
        added.append(numpy_helper.from_array(np.array(_U8_ZERO, np.uint8), name))
        for n in [node, *dqs]:
            n.input[2] = name
        rewritten.add(node.output[0])
    graph.initializer.extend(added)
    for info in [v for v in graph.value_info if v.name in rewritten]:     # declared INT8: let ORT infer
        graph.value_info.remove(info)
    used = {name for node in all_nodes(graph) for name in node.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and i.name not in used]:
        graph.initializer.remove(init)      # the S8 zero points left unread (ORT would log a line each)
    return len(rewritten)


class CpuInt8Model:
    """What ONNX Runtime loads for an INT8 model on the CPU: the rewritten graph's bytes, its
    external weights (if any) read from beside the original file (``session_config``)."""

    def __init__(self, path: Path):
        import onnx
        from onnx.external_data_helper import uses_external_data

        model = onnx.load(str(path), load_external_data=False)      # the rewrite touches inline scalars only
        external = any(uses_external_data(t) for t in model.graph.initializer)
        self.rewritten = unsigned_activations(model, str(path.parent))
        self.source = model.SerializeToString()
        self.session_config = {_EXTERNAL_FOLDER: str(path.parent.resolve())} if external else {}
