"""Engine naming, sidecars and the compatibility rules (no TensorRT, no GPU needed)."""
from types import SimpleNamespace
import json

import pytest

from edgediff.runtime.files import sha256_file, write_json_atomic
from edgediff.runtime.engines import (BatchProfile, EngineError, EngineKey, batch_profile, incompatibility,
                                      make_sidecar, model_digest, read_sidecar, select_engine, sidecar_path,
                                      timing_cache_name)

SHA = "ab" * 32
KEY = EngineKey("fp16", "9.0", "10.12.0.36", SHA, BatchProfile(1, 16, 32))


def _install(bundle_dir, key=KEY, payload=b"engine-bytes"):
    folder = bundle_dir / "engines"
    folder.mkdir(exist_ok=True)
    path = folder / key.name
    path.write_bytes(payload)
    write_json_atomic(sidecar_path(path), make_sidecar(key, sha256_file(path), "model_fp16.onnx"))
    return path


def test_guidance_doubles_opt_and_max_but_not_min():
    assert batch_profile(1, 8, 16, guidance=True) == BatchProfile(1, 16, 32)
    assert batch_profile(1, 8, 16, guidance=False) == BatchProfile(1, 8, 16)
    assert batch_profile(2, 4).max == 8                      # max defaults to opt, doubled


@pytest.mark.parametrize("args", [(0, 1, 1), (4, 2, 8), (1, 8, 4)])
def test_profile_order_is_enforced(args):
    with pytest.raises(ValueError, match="min"):
        batch_profile(*args)


def test_name_says_what_the_engine_depends_on():
    assert KEY.name == "fp16_sm90_trt10.12.0.36_b1-16-32_abababababab.engine"
    assert timing_cache_name("8.6", "10.12.0.36") == "timing_sm86_trt10.12.0.36.cache"
    with pytest.raises(ValueError, match="precision"):
        EngineKey("bf8", "9.0", "10.12", SHA, BatchProfile(1, 1, 1))


def test_sidecar_records_everything_checked():
    side = make_sidecar(KEY, "cd" * 32, "model_fp16.onnx", gpu_name="H100")
    assert side["profile"] == {"min": 1, "opt": 16, "max": 32}
    assert {side[k] for k in ("precision", "compute_capability", "tensorrt_version", "onnx_sha256")} == \
        {"fp16", "9.0", "10.12.0.36", SHA}
    assert side["strongly_typed"] and side["gpu_name"] == "H100"
    assert incompatibility(side, KEY) is None


@pytest.mark.parametrize("change, reason", [
    (dict(precision="int8"), "built for fp16, int8 was asked for"),
    (dict(compute_capability="8.6"), "compute capability 9.0 GPU, this GPU is 8.6"),
    (dict(tensorrt_version="10.13.0.35"), "TensorRT 10.12.0.36, this is TensorRT 10.13.0.35"),
    (dict(onnx_sha256="ef" * 32), "different ONNX file"),
])
def test_each_mismatch_gives_a_clear_refusal(change, reason):
    side = make_sidecar(KEY, "cd" * 32, "model_fp16.onnx")
    want = EngineKey(**{**KEY.__dict__, **change})
    assert reason in incompatibility(side, want)


def test_batch_outside_the_profile_is_refused():
    side = make_sidecar(KEY, "cd" * 32, "model_fp16.onnx")
    assert incompatibility(side, KEY, batch=32) is None
    assert "does not cover batch 64" in incompatibility(side, KEY, batch=64)
    assert "sidecar version" in incompatibility({**side, "sidecar_version": 99}, KEY)
    assert "batch profile" in incompatibility({**side, "profile": {"min": 3}}, KEY)


def test_select_engine_finds_a_compatible_one(tmp_path):
    path = _install(tmp_path)
    want = EngineKey("fp16", "9.0", "10.12.0.36", SHA)            # no profile: any that covers
    assert select_engine(tmp_path, want, batch=20) == (path, read_sidecar(path))


def test_select_engine_lists_why_each_candidate_was_refused(tmp_path):
    _install(tmp_path, EngineKey("fp16", "8.6", "10.12.0.36", SHA, BatchProfile(1, 2, 4)))
    want = EngineKey("fp16", "9.0", "10.12.0.36", SHA)
    with pytest.raises(EngineError) as err:
        select_engine(tmp_path, want)
    msg = str(err.value)
    assert "sm86" in msg and "this GPU is 9.0" in msg and "edgediff build" in msg and "--precision fp16" in msg


def test_altered_engine_or_missing_sidecar_is_never_run(tmp_path):
    path = _install(tmp_path)
    path.write_bytes(b"truncated")
    with pytest.raises(EngineError, match="sha256"):
        select_engine(tmp_path, KEY)
    sidecar_path(path).unlink()
    with pytest.raises(EngineError, match="no sidecar"):
        select_engine(tmp_path, KEY)


def test_no_engines_yet(tmp_path):
    with pytest.raises(EngineError, match="none built yet"):
        select_engine(tmp_path, KEY, batch=4)


def test_model_digest_covers_external_data():
    manifest = SimpleNamespace(models={"fp16": "m.onnx"}, files={"m.onnx": SHA})
    assert model_digest(manifest, "fp16") == SHA
    with_data = SimpleNamespace(models={"fp16": "m.onnx"}, files={"m.onnx": SHA, "m.onnx.data": "cd" * 32})
    assert model_digest(with_data, "fp16") not in (SHA, "cd" * 32)
    with pytest.raises(EngineError, match="no int8 model"):
        model_digest(manifest, "int8")


def test_sidecar_is_json_next_to_the_engine(tmp_path):
    path = _install(tmp_path)
    assert sidecar_path(path).name == path.name + ".json"
    assert json.loads(sidecar_path(path).read_text())["engine_sha256"] == sha256_file(path)
