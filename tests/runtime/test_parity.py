"""The parity gate compares shapes before values: a mismatch is a failed check, not a crash."""
import json

import numpy as np

from edgediff.runtime.parity import ParityResult


def _result():
    return ParityResult("ref", "cand", 1e-5, 1e-4)


def test_equal_outputs_pass():
    res = _result()
    res.add("t=0", {"eps": np.ones((1, 1, 8, 8), np.float32)}, {"eps": np.ones((1, 1, 8, 8), np.float32)})
    assert res.passed and res.mismatches == [] and res.worst_rel_l2 == 0.0


def test_shape_mismatch_fails_with_a_clear_message():
    res = _result()
    ref = {"eps": np.ones((1, 1, 8, 8), np.float32)}
    # (1, 1, 6, 6) would not broadcast against (1, 1, 8, 8); (1, 1, 1, 8) would, silently
    for got in (np.ones((1, 1, 6, 6)), np.ones((1, 1, 1, 8))):
        case = res.add("batch=1 t=0", ref, {"eps": got})
        assert case.checks[0].mismatch.startswith("eps: shape (1, 1, ")
        assert case.checks[0].rel_l2 == float("inf")
    assert not res.passed
    assert res.mismatches[0] == "batch=1 t=0: eps: shape (1, 1, 6, 6) differs from the reference's (1, 1, 8, 8)"
    summary = res.summary()
    assert summary.startswith("FAIL") and "shape mismatch in 2 check(s)" in summary and "\n" not in summary
    json.dumps(res.to_dict())                  # still serialisable for parity.json


def test_mismatch_in_one_output_of_two_fails():
    res = _result()
    ref = {"c": np.zeros((3, 2, 4, 4)), "eps": np.zeros((3, 2, 4, 4))}
    res.add("t=1", ref, {"c": np.zeros((3, 2, 4, 4)), "eps": np.zeros((3, 4, 4, 4))})
    assert not res.passed and [c.name for c in res.cases[0].checks if c.mismatch] == ["eps"]
