"""Every TensorRT and cuda-python name the GPU code uses exists, with a fitting signature, in
the real bindings of TensorRT 10.12 (the oldest accepted), 10.16 (what the gpu-* extras
resolve to) and 11.4, with cuda-python 12 and 13.

The stand-ins of test_trt_backend.py accept whatever the code calls, so a wrong name could
never fail them; this checks the names against the bindings themselves (``make bindings``
lays them out under build/bindings/, importable on a CPU: scripts/trt_bindings.py), each
pair in its own interpreter (tests/runtime/trt_names.py)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCES = ["runtime/backends/trt.py", "export/trt_build.py", "scripts/gpu_check.py"]
CHECKER = Path(__file__).with_name("trt_names.py")

spec = importlib.util.spec_from_file_location("trt_bindings", REPO / "scripts" / "trt_bindings.py")
trt_bindings = importlib.util.module_from_spec(spec)
spec.loader.exec_module(trt_bindings)

# Names the type-following must reach (so a lapse in it cannot pass by checking nothing).
MUST_CHECK = {
    "IExecutionContext.set_input_shape()", "IExecutionContext.get_tensor_shape()",
    "cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost", "IExecutionContext.set_tensor_address()",
    "IExecutionContext.execute_async_v3()", "ICudaEngine.get_tensor_dtype()", "ICudaEngine.num_io_tensors",
    "Runtime.deserialize_cuda_engine()", "Builder.build_serialized_network()", "IBuilderConfig.set_timing_cache()",
    "IBuilderConfig.clear_flag()", "ITimingCache.combine()", "ITimingCache.serialize()", "trt.BuilderFlag.TF32",
    "OnnxParser.parse_from_file()", "cudart.cudaMemcpyAsync()", "cudart.cudaMallocHost()", "cudart.cudaFreeHost()",
    "cudart.cudaStreamEndCapture()", "cudart.cudaGraphInstantiate()", "cudaDeviceProp.major", "cudart.cudaGetDeviceCount()",
}


@pytest.fixture(scope="module")
def bindings():
    root = REPO / "build" / "bindings"
    if (root / "UNAVAILABLE").is_file():
        pytest.skip(f"TensorRT bindings not laid out: {(root / 'UNAVAILABLE').read_text().strip()}")
    try:
        return trt_bindings.ensure(root)
    except trt_bindings.Unreachable as exc:
        pytest.skip(f"TensorRT bindings not laid out: the package index is unreachable or lacks them ({exc})")


def check(root: Path, pair: tuple[str, str], files: dict[str, str], names: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(root / p) for p in pair),
           "LD_LIBRARY_PATH": str(root / "stub")}
    proc = subprocess.run([sys.executable, str(CHECKER)], input=json.dumps({"files": files, "names": names}),
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def sources() -> dict[str, str]:
    return {p: (REPO / p).read_text() for p in SOURCES}


# The stand-ins of test_trt_backend.py -> what they imitate.
STAND_INS = {"FakeCuda": "cudart", "FakeContext": "IExecutionContext", "Engine": "ICudaEngine", "Runtime": "Runtime"}


def stand_in_names() -> dict[str, list[str]]:
    """The public methods and class attributes of test_trt_backend.py's stand-ins, so they
    cannot imitate a name the real bindings lack (cudart's: only the cuda* ones; the rest
    are the stand-in's own helpers)."""
    import ast

    tree = ast.parse((REPO / "tests" / "runtime" / "test_trt_backend.py").read_text())
    names: dict[str, list[str]] = {}
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name in STAND_INS):
        owner = STAND_INS[cls.name]
        for st in cls.body:
            found = [st.name] if isinstance(st, ast.FunctionDef) else \
                [t.id for t in st.targets if isinstance(t, ast.Name)] if isinstance(st, ast.Assign) else []
            names.setdefault(owner, []).extend(n for n in found if not n.startswith("_")
                                               and (owner != "cudart" or n.startswith("cuda")))
    return names


@pytest.mark.parametrize("pair", trt_bindings.PAIRS, ids=lambda p: f"{p[0]}+{p[1]}")
def test_every_tensorrt_and_cuda_name_exists_in_the_real_bindings(bindings, pair):
    report = check(bindings, pair, sources(), stand_in_names())
    assert report["tensorrt"] == pair[0].split("-")[1] and report["cuda_bindings"] == pair[1].split("-")[1]
    assert report["missing"] == []
    checked = {r["name"] for r in report["refs"] if r["ok"]}
    assert MUST_CHECK <= checked, sorted(MUST_CHECK - checked)


MUTATIONS = [  # (file, text, changed text, the name reported missing)
    ("runtime/backends/trt.py", ".set_input_shape(", ".set_input_shapes(", "IExecutionContext.set_input_shapes"),
    ("runtime/backends/trt.py", "rt.cudaStreamSynchronize(", "rt.cudaStreamSynchronise(", "cudart.cudaStreamSynchronise"),
    ("runtime/backends/trt.py", "trt.TensorIOMode.INPUT", "trt.TensorIOMode.IN", "trt.TensorIOMode.IN"),
    ("runtime/backends/trt.py", "cudaMemcpyHostToDevice", "cudaMemcpyHostToDev",
     "cudart.cudaMemcpyKind.cudaMemcpyHostToDev"),
    ("export/trt_build.py", "ignore_mismatch=False", "ignore_mismatches=False", "IBuilderConfig.set_timing_cache()"),
    ("export/trt_build.py", "trt.BuilderFlag.TF32", "trt.BuilderFlag.TF_32", "trt.BuilderFlag.TF_32"),
    ("export/trt_build.py", ".combine(", ".merge(", "ITimingCache.merge"),
]


def test_a_name_changed_in_the_code_fails(bindings):
    """Each mutation alone would fail the check: all applied at once, each is reported."""
    files = sources()
    for path, old, new, _ in MUTATIONS:
        assert old in files[path], f"{path} no longer contains {old!r}: update MUTATIONS"
        files[path] = files[path].replace(old, new, 1)
    missing = check(bindings, trt_bindings.PAIRS[0], files)["missing"]
    for path, _, _, name in MUTATIONS:
        assert any(m.startswith(path) and f": {name}" in m for m in missing), (name, missing)


def test_the_stand_ins_imitate_only_real_names(bindings):
    names = stand_in_names()
    assert {"cudaMallocHost", "cudaMemcpyKind"} <= set(names["cudart"]) and "get_tensor_shape" in names["IExecutionContext"]
    names["IExecutionContext"].append("execute_async_v4")        # a stand-in of a method that does not exist
    missing = check(bindings, trt_bindings.PAIRS[0], {}, names)["missing"]
    assert missing == ["stand-in: IExecutionContext.execute_async_v4"]
