"""Engine building: profile and config construction, validation, the missing-TensorRT error.

The builder is driven through a recording stand-in for the ``tensorrt`` module, so the call
sequence (strongly typed network, parse from file, profile, timing cache, atomic write,
sidecar) is checked without TensorRT; the real build is marked ``tensorrt`` and skips here.
"""
import importlib.util
import shutil
import signal
import types
from pathlib import Path

import numpy as np
import pytest

from types import SimpleNamespace as NS

from edgediff.export import trt_build
from edgediff.export.models import FAMILIES
from edgediff.export.trt_build import BuildOptions, build_engine, engine_profile, profile_shapes
from edgediff.runtime.backends.base import BackendError
from edgediff.runtime.engines import BatchProfile, EngineError, EngineKey, read_sidecar, select_engine

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
INPUTS = {"x": {"dtype": "float32", "shape": ["batch", 4, 32, 32]}, "t": {"dtype": "float32", "shape": ["batch"]},
          "y": {"dtype": "int64", "shape": ["batch"]}}


def test_profile_covers_the_doubled_guidance_batch():
    manifest = NS(guidable=True, max_batch=None)
    prof = engine_profile(manifest, BuildOptions(min_batch=1, opt_batch=8, max_batch=16))
    assert prof == BatchProfile(1, 16, 32)
    assert engine_profile(NS(guidable=False, max_batch=None), BuildOptions(opt_batch=8)) == BatchProfile(1, 8, 8)
    assert engine_profile(manifest, BuildOptions(opt_batch=8, guidance=False)).max == 8


def test_profile_respects_the_bundles_max_batch():
    with pytest.raises(ValueError, match="exceeds the bundle's exported max_batch 16"):
        engine_profile(NS(guidable=True, max_batch=16), BuildOptions(opt_batch=8, max_batch=16))


def test_profile_shapes_replace_only_the_batch_axis():
    shapes = profile_shapes(INPUTS, BatchProfile(1, 16, 32))
    assert shapes["x"] == ((1, 4, 32, 32), (16, 4, 32, 32), (32, 4, 32, 32))
    assert shapes["t"] == ((1,), (16,), (32,))
    with pytest.raises(ValueError, match="symbolic batch"):
        profile_shapes({"x": {"shape": [2, 4]}}, BatchProfile(1, 1, 1))


@pytest.mark.parametrize("kwargs, match", [(dict(precision="bf16"), "precision"),
                                           (dict(workspace_gib=0), "workspace"),
                                           (dict(optimization_level=7), "optimization-level")])
def test_options_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BuildOptions(**kwargs)


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here")
def test_missing_tensorrt_is_one_line_naming_the_extra(tiny_bundle):
    with pytest.raises(BackendError) as err:
        build_engine(tiny_bundle, BuildOptions(precision="fp32"))
    msg = str(err.value)
    assert "\n" not in msg and "edgediff[gpu-cu12]" in msg and "TensorRT" in msg


# --- a recording stand-in for the tensorrt module ---------------------------------------

class _Rec:
    """Accepts any call chain, records it, returns itself (or what ``answers`` says)."""

    def __init__(self, log, path="trt", answers=None):
        self._log, self._path, self._answers = log, path, answers or {}

    def __getattr__(self, name):
        return _Rec(self._log, f"{self._path}.{name}", self._answers)

    def __call__(self, *args, **kwargs):
        self._log.append((self._path, args, kwargs))
        answer = self._answers.get(self._path.rsplit(".", 1)[-1])
        return answer(*args) if callable(answer) else (answer if answer is not None else self)

    def __int__(self):
        return 3

    __index__ = __int__

    def __setattr__(self, name, value):
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            self._log.append((f"{self._path}.{name}=", (value,), {}))


def fake_tensorrt(inputs=("x", "t", "y"), parsed=True, built=b"ENGINE"):
    log = []
    answers = {"parse_from_file": parsed, "num_inputs": None, "build_serialized_network": built,
               "serialize": b"CACHE", "get_input": lambda i: types.SimpleNamespace(name=inputs[i])}
    trt = _Rec(log, answers=answers)
    network = _Rec(log, "network", answers)
    object.__setattr__(network, "num_inputs", len(inputs))
    answers["create_network"] = network
    object.__setattr__(trt, "__version__", "10.12.0.36")
    return trt, log


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from edgediff.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("trt") / "b"
    export_bundle("dit", dict(FAMILIES["dit"].configs["tiny"]), out, log=lambda m: None)
    return out


@pytest.fixture
def tiny_bundle(exported, tmp_path):
    """A fresh copy per test: builds write into the bundle's engines/."""
    return Path(shutil.copytree(exported, tmp_path / "b"))


@pytest.fixture
def fake_build(monkeypatch):
    trt, log = fake_tensorrt()
    monkeypatch.setattr(trt_build, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(trt_build, "device_info", lambda d=0: {"compute_capability": "9.0", "name": "H100"})
    return log


def test_build_uses_only_the_strongly_typed_api(tiny_bundle, fake_build):
    path = build_engine(tiny_bundle, BuildOptions(precision="fp32", opt_batch=4, max_batch=8), log=lambda m: None)
    calls = [c[0] for c in fake_build]
    create = next(c for c in fake_build if c[0].endswith("create_network"))
    assert create[1] == (1 << 3,)                     # 1 << int(STRONGLY_TYPED) (the stand-in's int is 3)
    assert not any("set_flag" in c or "FP16" in c or "INT8" in c for c in calls)    # no precision flags
    parse = next(c for c in fake_build if c[0].endswith("parse_from_file"))
    assert parse[1][0].endswith("model.onnx")                                       # from the file
    shapes = {c[1][0]: c[1][1:] for c in fake_build if c[0].endswith("set_shape")}
    assert shapes["x"] == ((1, 1, 8, 8), (8, 1, 8, 8), (16, 1, 8, 8))              # DiT tiny has a null label
    assert [c[1][0]._path for c in fake_build if c[0].endswith("clear_flag")] == ["trt.BuilderFlag.TF32"]
    assert path.read_bytes() == b"ENGINE" and path.parent.name == "engines"
    side = read_sidecar(path)
    assert side["profile"] == {"min": 1, "opt": 8, "max": 16} and side["compute_capability"] == "9.0"
    assert (path.parent / "timing_sm90_trt10.12.0.36.cache").read_bytes() == b"CACHE"
    want = EngineKey("fp32", "9.0", "10.12.0.36", side["onnx_sha256"])
    assert select_engine(tiny_bundle, want, batch=16)[0] == path


def test_existing_engine_is_reused_unless_forced(tiny_bundle, fake_build):
    opts = BuildOptions(precision="fp32")
    first = build_engine(tiny_bundle, opts, log=lambda m: None)
    n = len(fake_build)
    messages = []
    assert build_engine(tiny_bundle, opts, log=messages.append) == first and len(fake_build) == n
    assert "up to date" in messages[0]
    build_engine(tiny_bundle, BuildOptions(precision="fp32", force=True), log=lambda m: None)
    assert len(fake_build) > n


def test_build_on_a_signed_bundle_says_to_re_sign(tiny_bundle, fake_build, tmp_path):
    """The signature covers engines/, so a build after signing says so (signing itself needs
    the sign extra: test_signing.py; here the signature file's presence is what counts)."""
    messages = []
    build_engine(tiny_bundle, BuildOptions(precision="fp32"), log=messages.append)
    assert not any("re-sign" in m for m in messages)
    (tiny_bundle / "bundle.sig").write_text("{}")
    build_engine(tiny_bundle, BuildOptions(precision="fp32", force=True), log=messages.append)
    assert "re-sign it (edgediff sign" in messages[-1]


def test_timing_cache_refused_or_missing(tiny_bundle, monkeypatch):
    """set_timing_cache's verdict is checked (a refused cache is a one-line error, no engine);
    a builder that returns no timing cache writes none (and the engine is still written)."""
    for answer, raised in ((False, True), (None, False)):
        trt, _ = fake_tensorrt()
        key = "set_timing_cache" if raised else "get_timing_cache"
        trt._answers[key] = (lambda *a: False) if raised else (lambda *a: None)
        monkeypatch.setattr(trt_build, "import_tensorrt", lambda: trt)
        monkeypatch.setattr(trt_build, "device_info", lambda d=0: {"compute_capability": "9.0", "name": "H100"})
        if raised:
            with pytest.raises(EngineError, match="refused the timing cache"):
                build_engine(tiny_bundle, BuildOptions(precision="fp32"), log=lambda m: None)
            assert not list((tiny_bundle / "engines").glob("*.engine")) if (tiny_bundle / "engines").exists() else True
        else:
            path = build_engine(tiny_bundle, BuildOptions(precision="fp32", force=True), log=lambda m: None)
            assert path.is_file() and not list(path.parent.glob("timing_*.cache"))


def test_timing_cache_is_loaded_back(tiny_bundle, fake_build, tmp_path):
    cache = tmp_path / "my.cache"
    cache.write_bytes(b"OLD")
    build_engine(tiny_bundle, BuildOptions(precision="fp32", timing_cache=cache), log=lambda m: None)
    created = next(c for c in fake_build if c[0].endswith("create_timing_cache"))
    assert created[1][0] == b"OLD" and cache.read_bytes() == b"CACHE"


def test_parser_errors_and_missing_precision_are_clear(tiny_bundle, monkeypatch):
    trt, _ = fake_tensorrt(parsed=False)
    monkeypatch.setattr(trt_build, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(trt_build, "device_info", lambda d=0: {"compute_capability": "9.0", "name": "x"})
    with pytest.raises(EngineError, match="parser rejected model.onnx"):
        build_engine(tiny_bundle, BuildOptions(precision="fp32"), log=lambda m: None)
    with pytest.raises(ValueError, match="no fp16 model"):
        build_engine(tiny_bundle, BuildOptions(precision="fp16"), log=lambda m: None)


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAVE_TRT, reason="TensorRT is not installed")
def test_real_fp32_engine_matches_onnx_runtime(tiny_bundle):
    from edgediff.runtime import read_bundle
    from edgediff.runtime.backends import load_backend
    from edgediff.runtime.parity import rel_l2

    build_engine(tiny_bundle, BuildOptions(precision="fp32", opt_batch=2, max_batch=4), log=lambda m: None)
    bundle = read_bundle(tiny_bundle)
    feed = {"x": np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32),
            "t": np.array([0, 500, 999], np.float32), "y": np.array([1, 10, 3], np.int64)}
    ref = load_backend(bundle, "ort", "fp32").infer(feed)
    got = load_backend(bundle, "trt", "fp32", max_batch=3).infer(feed)
    assert all(rel_l2(ref[k], got[k]) <= 1e-3 for k in ref)


def test_cli_add_precision_then_build(tiny_bundle, fake_build):
    """The commands as the user runs them: FP16 added to a bundle, then its engine built."""
    pytest.importorskip("modelopt.onnx.autocast", reason="nvidia-modelopt (the fp16 extra) is not installed")
    from click.testing import CliRunner

    from edgediff.cli_precision import add_precision, build

    runner = CliRunner()
    added = runner.invoke(add_precision, [str(tiny_bundle), "--precision", "fp16"])
    assert added.exit_code == 0, added.output
    assert "PASS: onnx-fp16" in added.output and "rung-1 validated" in added.output
    built = runner.invoke(build, [str(tiny_bundle), "--opt-batch", "2", "--max-batch", "4"])
    assert built.exit_code == 0, built.output
    parse = next(c for c in fake_build if c[0].endswith("parse_from_file"))
    assert parse[1][0].endswith("model_fp16.onnx")
    bad = runner.invoke(build, [str(tiny_bundle), "--opt-batch", "8", "--max-batch", "4"])
    assert bad.exit_code != 0 and "--min-batch ≤ --opt-batch ≤ --max-batch" in str(bad.exception)


def _listing(root):
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("first", [True, False], ids=["first-build", "forced-rebuild"])
def test_interrupted_build_leaves_the_bundle_as_it_was(tiny_bundle, monkeypatch, capsys, signum, code, first):
    """`edgediff build` hit by a signal while TensorRT builds: exit 130/143 with one line, no
    engine, sidecar or temporary written, no engines/ folder left by a first build, and an
    existing engine untouched by a forced rebuild."""
    from edgediff.cli import main

    if not first:
        monkeypatch.setattr(trt_build, "import_tensorrt", lambda: fake_tensorrt()[0])
        monkeypatch.setattr(trt_build, "device_info", lambda d=0: {"compute_capability": "9.0", "name": "H100"})
        build_engine(tiny_bundle, BuildOptions(precision="fp32"), log=lambda m: None)

    def interrupted(*args):
        signal.raise_signal(signum)                # delivered while the builder runs
        return b"NEW ENGINE"

    trt, _ = fake_tensorrt(built=interrupted)
    monkeypatch.setattr(trt_build, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(trt_build, "device_info", lambda d=0: {"compute_capability": "9.0", "name": "H100"})
    before = _listing(tiny_bundle)
    with pytest.raises(SystemExit) as exc:
        main(["build", str(tiny_bundle), "--precision", "fp32", "--force"])
    err = capsys.readouterr().err
    assert exc.value.code == code and "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted", err
    assert _listing(tiny_bundle) == before
    assert (tiny_bundle / "engines").is_dir() != first


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tf32_is_off_for_every_precision(precision):
    """FP32 engines are parity references, and the FP32 islands of FP16/INT8 models are FP32
    for their mantissa: TF32 (10-bit mantissa) would undo them."""
    trt, log = fake_tensorrt()
    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    network = builder.create_network(0)
    trt_build._config(trt, builder, network, {"x": ((1,), (1,), (1,)), "t": ((1,), (1,), (1,)),
                                              "y": ((1,), (1,), (1,))}, BuildOptions(precision=precision), b"")
    cleared = [c[1][0]._path for c in log if c[0].endswith("clear_flag")]
    assert cleared == ["trt.BuilderFlag.TF32"] and not any(c[0].endswith("set_flag") for c in log)


class _Cache:
    """A timing cache: a set of entries, serialised as sorted bytes."""

    def __init__(self, data=b""):
        self.entries = set(data.split(b",")) - {b""}

    def combine(self, other, ignore_mismatch):
        self.entries |= other.entries
        return True

    def serialize(self):
        return b",".join(sorted(self.entries))


def test_a_shared_timing_cache_written_during_the_build_is_merged_not_overwritten(tmp_path):
    """Another build wrote the shared cache after this one read it: its entries are kept."""
    path = tmp_path / "shared.cache"
    path.write_bytes(b"a")
    timing = trt_build.TimingCache(_Cache(b"a,mine"), b"a", NS(create_timing_cache=_Cache))
    path.write_bytes(b"a,theirs")                               # the other build finished first
    trt_build.save_timing_cache(timing, path, log=lambda m: None)
    assert path.read_bytes() == b"a,mine,theirs" and (tmp_path / "shared.cache.lock").is_file()
    timing = trt_build.TimingCache(_Cache(b"b"), b"a,mine,theirs", NS(create_timing_cache=_Cache))
    trt_build.save_timing_cache(timing, path, log=lambda m: None)
    assert path.read_bytes() == b"b"             # unchanged since read: this build's cache already holds it


def test_an_unmergeable_cache_on_disk_is_replaced_with_a_note(tmp_path):
    path = tmp_path / "shared.cache"
    path.write_bytes(b"other-gpu")
    refused = NS(create_timing_cache=lambda data: None)
    messages = []
    trt_build.save_timing_cache(trt_build.TimingCache(_Cache(b"mine"), b"", refused), path, log=messages.append)
    assert path.read_bytes() == b"mine" and "could not be merged" in messages[0]


def test_the_merge_waits_for_the_lock(tmp_path):
    """A second writer holding <cache>.lock: the save waits for it, then merges what it wrote."""
    import fcntl
    import threading
    import time

    path = tmp_path / "shared.cache"
    timing = trt_build.TimingCache(_Cache(b"mine"), b"", NS(create_timing_cache=_Cache))
    with open(tmp_path / "shared.cache.lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        saver = threading.Thread(target=trt_build.save_timing_cache, args=(timing, path), kwargs={"log": print})
        saver.start()
        time.sleep(0.3)
        assert saver.is_alive() and not path.exists()            # blocked on the lock
        path.write_bytes(b"theirs")                              # the holder's own write
        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    saver.join(5)
    assert path.read_bytes() == b"mine,theirs"
