"""The sample-quality gate of a lower precision (digits/precision_gate.py): the verdict's
thresholds, the judge on real samples of the shipped DiT, and add-precision failing on it."""
import pytest

from edgediff.digits.judge import JudgeResult
from edgediff.digits.precision_gate import QualityGate, judge_applies, quality_gate


def _result(acc, fd):
    return JudgeResult(500, acc, fd, 0.98, 4.1, (acc,) * 10)


@pytest.mark.parametrize("acc, fd, passed", [(0.97, 10.0, True), (0.9799, 12.5, True), (0.969, 10.0, False),
                                             (0.99, 12.6, False)])
def test_verdict_is_two_points_and_a_quarter_more_fd(acc, fd, passed):
    gate = QualityGate(_result(0.99, 10.0), _result(acc, fd))
    assert gate.passed is passed and gate.summary().startswith("PASS" if passed else "FAIL")
    assert gate.to_dict()["passed"] is passed


@pytest.fixture(scope="module")
def dit_bundle(tmp_path_factory):
    from edgediff.digits.demo import ensure_bundle

    return ensure_bundle("dit", tmp_path_factory.mktemp("gate") / "digits-dit", log=lambda m: None)


def test_fp32_against_itself_passes_and_the_judge_applies(dit_bundle):
    from edgediff.runtime.bundle import read_bundle
    from edgediff.runtime.pipeline import Pipeline

    assert judge_applies(read_bundle(dit_bundle).manifest)
    with Pipeline.from_bundle(dit_bundle) as pipe:
        gate = quality_gate(dit_bundle, pipe.backend, per_class=3)
    assert gate.passed and gate.int8.n == 30 and gate.int8.accuracy == gate.fp32.accuracy


def test_add_precision_fails_on_a_missed_quality_gate(dit_bundle, tmp_path, one_thread):
    pytest.importorskip("modelopt.onnx.quantization")
    import shutil

    from fs_snapshot import snapshot

    from edgediff.export.int8 import Int8Error
    from edgediff.export.int8_bundle import add_int8

    bundle = tmp_path / "b"
    shutil.copytree(dit_bundle, bundle)
    before = snapshot(bundle)
    failing = lambda path, backend: QualityGate(_result(0.99, 10.0), _result(0.5, 90.0))   # noqa: E731
    with pytest.raises(Int8Error, match=r"INT8 sample quality misses the gate: FAIL: judge accuracy 50\.0%.*int8\.failed"):
        add_int8(bundle, calib_samples=2, calib_cap=2, judge=failing, log=lambda m: None)
    assert snapshot(bundle) == before
