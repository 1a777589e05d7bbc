"""The drift machinery of `edgediff parity` (runtime/drift.py) on NumPy models whose error is
known exactly: a candidate whose outputs are the reference's times (1 + δ) must show
per-forward rel-L2 δ at every forward, whatever the sampler does with it."""
import json

import numpy as np
import pytest

from edgediff.cli_parity import _json_safe
from edgediff.runtime.backends import Backend
from edgediff.runtime.drift import GATES, Tee, component_drift, component_feed, denoiser_drift, x0_of
from edgediff.runtime.manifest import Component, Manifest
from edgediff.runtime.polygraphy_check import snr_db
from edgediff.runtime.schedules import Schedule

DECL = {"dtype": "float32", "shape": ["batch", 1, 4, 4]}


def manifest(schedule=None, outputs=("eps",), prediction="epsilon") -> Manifest:
    return Manifest(family="test", config={}, prediction=prediction, time={}, schedule=schedule or {},
                    sample_shape=(1, 4, 4), models={"fp32": "model.onnx"}, num_classes=10, null_label=10,
                    inputs={"x": DECL, "t": {"dtype": "float32", "shape": ["batch"]},
                            "y": {"dtype": "int64", "shape": ["batch"]}},
                    outputs={n: DECL for n in outputs})


class Scaled(Backend):
    """A row-wise NumPy denoiser; ``scale`` multiplies every output (the candidate's error)."""

    def __init__(self, m: Manifest, scale: float = 1.0):
        super().__init__(m.inputs, m.output_names)
        self.scale, self.calls = scale, 0

    def infer_impl(self, feed):
        self.calls += 1
        x, t = feed["x"], feed["t"].reshape(-1, 1, 1, 1)
        y = feed["y"].reshape(-1, 1, 1, 1)
        out = np.tanh(0.5 * x + 0.001 * t + 0.01 * y) * self.scale
        return [out.astype(np.float32) for _ in self.outputs]


def test_a_known_error_is_measured_per_forward_and_accumulates_along_the_trajectory():
    m = manifest()
    delta = 1e-3
    report = denoiser_drift(m, Scaled(m), Scaled(m, 1 + delta), n=3, sampler="ddim", steps=6, seed=1)
    assert len(report.steps) == 6 and all(len(s["forwards"]) == 1 for s in report.steps)
    for fw in report.forwards():
        assert fw["outputs"]["eps"]["rel_l2"] == pytest.approx(delta, rel=1e-3)
        assert 0 < fw["x0"]["rel_l2"]
    # the free-running candidate drifts: x_t and the x0 estimate differ from the first step on
    assert all(s["x_t"]["rel_l2"] > 0 and s["x0_estimate"]["rel_l2"] > 0 for s in report.steps)
    assert report.passed and report.worst_rel_l2 == pytest.approx(delta, rel=1e-3)
    assert report.settings["labels"] == [0, 1, 2]
    assert report.final["images"]["psnr_db"] > 30

    bad = denoiser_drift(m, Scaled(m), Scaled(m, 1.02), n=2, sampler="ddim", steps=4, gate=GATES["fp16"])
    assert not bad.passed and "per-forward rel-L2 2.00e-02 (eps at t = " in bad.failures[0]
    json.dumps(_json_safe(bad.to_dict()))          # strict JSON


def test_lockstep_feeds_the_candidate_the_references_inputs_and_counts_every_forward():
    """Heun calls the model twice per step but the last; the reference drives, the candidate
    follows: with guidance both see the [conditional | null] batch of one call."""
    m = manifest()
    ref, cand = Scaled(m), Scaled(m)
    report = denoiser_drift(m, ref, cand, n=2, sampler="heun", steps=4, guidance=3.0)
    assert [len(s["forwards"]) for s in report.steps] == [2, 2, 2, 1]
    # first, middle and last feeds kept (for Polygraphy); guided: 2n rows
    assert len(report.feeds) == 3 and all(len(f["x"]) == 4 for f in report.feeds)
    assert report.settings["forwards"] == 7
    assert report.worst_rel_l2 == 0 and report.final["samples"]["rel_l2"] == 0
    assert report.final["images"]["psnr_db"] == float("inf") and report.passed
    assert cand.calls == 14                         # 7 in lockstep + 7 on its own trajectory


def test_identical_models_tee_returns_the_references_outputs():
    m = manifest()
    tee = Tee(Scaled(m), Scaled(m, 2.0), Schedule.from_config({}))
    feed = {"x": np.ones((2, 1, 4, 4), np.float32), "t": np.full(2, 10, np.float32), "y": np.zeros(2, np.int64)}
    out = tee.infer(feed)
    np.testing.assert_array_equal(out["eps"], Scaled(m).infer(feed)["eps"])
    assert tee.calls[0]["outputs"]["eps"]["rel_l2"] == pytest.approx(1.0)
    assert tee.calls[0]["t"] == 10.0


def test_x0_of_every_prediction_type_at_the_calls_t():
    sched = Schedule.from_config({})
    rng = np.random.default_rng(0)
    x, out = rng.standard_normal((2, 1, 4, 4)), rng.standard_normal((2, 1, 4, 4))
    feed = {"x": x, "t": np.full(2, 500, np.float32)}
    a = np.sqrt(sched.alphas_cumprod[500])
    s = np.sqrt(1 - sched.alphas_cumprod[500])
    np.testing.assert_allclose(x0_of({"eps": out}, feed, sched), (x - s * out) / a, rtol=1e-10)
    np.testing.assert_allclose(x0_of({"v": out}, feed, sched), a * x - s * out, rtol=1e-10)
    np.testing.assert_array_equal(x0_of({"x0": out}, feed, sched), out)
    ddm = Schedule.from_config({"type": "ddm_constant"})
    c, feed = rng.standard_normal(x.shape), {"x": x, "t": np.full(2, 0.25, np.float32)}
    np.testing.assert_allclose(x0_of({"c": c, "eps": out}, feed, ddm), x - 0.25 * c - 0.5 * out)


class Decoder(Backend):
    def __init__(self, comp, scale=1.0):
        super().__init__(comp.inputs, comp.output_names)
        self.scale = scale

    def infer_impl(self, feed):
        z = feed["latents"]
        return [(np.tanh(z[:, :1].repeat(2, axis=2).repeat(2, axis=3)) * self.scale).astype(np.float32)]


def test_components_are_compared_per_forward_on_seeded_draws_of_their_shapes():
    comp = Component(inputs={"latents": {"dtype": "float32", "shape": ["batch", 4, 2, 2]}},
                     outputs={"image": {"dtype": "float32", "shape": ["batch", 1, 4, 4]}}, models={"fp32": "d.onnx"})
    report = component_drift(comp, Decoder(comp), Decoder(comp, 1.01), cases=3, seed=2)
    assert [fw["outputs"]["image"]["rel_l2"] for fw in report.forwards()] == pytest.approx([0.01] * 3, rel=1e-5)
    assert not report.passed and len(report.feeds) == 3
    ids = Component(inputs={"input_ids": {"dtype": "int64", "shape": ["batch", 8]}}, outputs={},
                    models={}, extra={"config": {"vocab_size": 100}})
    feed = component_feed(ids, 4, np.random.default_rng(0))["input_ids"]
    assert feed.dtype == np.int64 and (feed[:, 0] == 98).all() and feed.max() <= 99


def test_polygraphy_snr_threshold_is_the_rel_l2_gate():
    assert snr_db(5e-3) == pytest.approx(46.0206, abs=1e-4)
    assert snr_db(1e-2) == pytest.approx(40.0)
