"""INT8 models on ONNX Runtime's CPU provider: activations loaded as U8, exactly."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgediff.runtime.backends.base import BackendError
from edgediff.runtime.backends.ort import OrtBackend
from edgediff.runtime.backends.ort_int8 import CpuInt8Model, unsigned_activations

ort = pytest.importorskip("onnxruntime")


def _qdq_model() -> onnx.ModelProto:
    """x -> Q(S8, zero 0) read by two DQs (a shared activation, as in a U-Net) -> Conv and Add;
    the weight's Q (of an initializer) must stay S8."""
    rng = np.random.default_rng(0)
    init = [numpy_helper.from_array(np.float32(0.02), "xs"), numpy_helper.from_array(np.int8(0), "xz"),
            numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
            numpy_helper.from_array(np.full(4, 0.01, np.float32), "ws"), numpy_helper.from_array(np.zeros(4, np.int8), "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd1"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd2"]),
             helper.make_node("QuantizeLinear", ["w", "ws", "wz"], ["wq"], axis=0),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd1", "wd"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("ReduceMean", ["xd2"], ["m"], axes=[1], keepdims=1),
             helper.make_node("Add", ["c", "m"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 5, 5])], init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _run(source, x):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # the Q/DQ semantics themselves
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_activations_become_u8_and_compute_exactly_the_same():
    model = _qdq_model()
    x = (np.random.default_rng(1).standard_normal((2, 3, 5, 5)) * 3).astype(np.float32)   # past the clamp too
    before = _run(model.SerializeToString(), x)
    assert unsigned_activations(model) == 1
    zero = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    q_x, q_w = (n for n in model.graph.node if n.op_type == "QuantizeLinear")
    assert zero[q_x.input[2]].dtype == np.uint8 and zero[q_x.input[2]] == 128
    assert zero[q_w.input[2]].dtype == np.int8                                   # weights stay signed
    assert {n.input[2] for n in model.graph.node if n.input and n.input[0] == "xq"} == {q_x.input[2]}
    np.testing.assert_array_equal(_run(model.SerializeToString(), x), before)


def test_backend_loads_int8_through_the_rewrite_and_external_weights_from_beside_the_model(tmp_path):
    model = _qdq_model()
    x = np.random.default_rng(2).standard_normal((2, 3, 5, 5)).astype(np.float32)
    expected = _run(model.SerializeToString(), x)
    onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    held = CpuInt8Model(tmp_path / "m.onnx")            # even the scalar zero points are external here
    assert held.rewritten == 1 and held.session_config          # weights are read where they are, not copied
    inputs = {"x": {"dtype": "float32", "shape": ["batch", 3, 5, 5]}}
    with OrtBackend(tmp_path / "m.onnx", inputs, ["y"], int8=True) as backend:
        assert backend.int8_rewritten == 1
        np.testing.assert_allclose(backend.infer({"x": x})["y"], expected, rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.data", "m.onnx"]


def _variant(change) -> int:
    model = _qdq_model()
    change(model)
    return unsigned_activations(model)


def test_what_the_rewrite_leaves_alone():
    from onnx import helper as h

    def nonzero(m):
        m.graph.initializer.append(numpy_helper.from_array(np.int8(3), "xz3"))
        for n in m.graph.node:
            if "xq" in n.output or "xq" in n.input:
                n.input[2] = "xz3"

    def other_reader(m):            # something besides a DQ reads the INT8 tensor
        m.graph.node.append(h.make_node("Identity", ["xq"], ["xq_copy"]))

    def graph_output(m):
        m.graph.output.append(h.make_tensor_value_info("xq", TensorProto.INT8, [2, 3, 5, 5]))

    def two_input_dq(m):
        dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "xq")
        del dq.input[2]

    assert _variant(lambda m: None) == 1
    for change in (nonzero, other_reader, graph_output, two_input_dq):
        assert _variant(change) == 0, change.__name__


def test_a_zero_point_shared_by_weights_and_activations_stays_for_the_weights():
    model = _qdq_model()
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[0] in ("w", "wq"):
            n.input[1], n.input[2] = "xs", "xz"       # per-tensor weight quantization sharing x's scalars
            del n.attribute[:]
    x = np.random.default_rng(3).standard_normal((2, 3, 5, 5)).astype(np.float32)
    before = _run(model.SerializeToString(), x)
    assert unsigned_activations(model) == 1
    assert "xz" in {i.name for i in model.graph.initializer}
    np.testing.assert_array_equal(_run(model.SerializeToString(), x), before)


def test_an_unreadable_int8_model_is_one_line(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"not a model")
    with pytest.raises(BackendError, match="cannot read the INT8 model"):
        OrtBackend(tmp_path / "m.onnx", {"x": {"dtype": "float32", "shape": [1]}}, ["y"], int8=True)
