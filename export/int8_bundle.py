"""``edgediff add-precision BUNDLE --precision int8``: calibrate on the bundle's own sampling
trajectories, quantize with FP32 islands by measurement (export/int8.py), gate per forward and
on sample quality, and install ``model_int8.onnx`` into the bundle.

The reference is the bundle's FP32 ONNX model on ONNX Runtime: rung 1 already holds it to
PyTorch within 1e-5, far below INT8's 5e-2 gate, and it needs no checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from edgediff.calibration.feeds import CalibrationFeeds, record_feeds
from edgediff.calibration.images import image_feeds, is_image_file
from edgediff.runtime.backends.base import BackendError, validate_feed
from edgediff.runtime.backends.ort import OrtBackend
from edgediff.runtime.bundle import read_bundle
from edgediff.runtime.conditions import COND_COMPONENT
from edgediff.runtime.errors import InvalidInput
from edgediff.runtime.files import staged_dir
from edgediff.runtime.manifest import TEXT_CONTEXT
from edgediff.runtime.parity import ParityResult

from .int8 import Int8Error, convert_int8, record, replace_record

INT8_FILE = "model_int8.onnx"
HELD_OUT_SEED = 1_000_003        # held-out trajectories: never the calibration draws


def _feeds(pipe, calib_data, samples: int, cap: int, log) -> tuple[CalibrationFeeds, CalibrationFeeds]:
    """Calibration feeds (recorded here, from real images, or ``calib_data`` from `edgediff
    calibrate`) and held-out trajectories of different seeds (a quarter of given feeds) for the gate."""
    m = pipe.manifest
    needs = ("prompts" if TEXT_CONTEXT in m.inputs else "condition images" if COND_COMPONENT in m.components else None)
    if calib_data is not None and is_image_file(calib_data):
        log(f"calibration feeds from the images in {calib_data}, diffused to every sampler step (≤ {cap} rows per "
            "step) ...")
        return image_feeds(pipe, calib_data, cap=cap, seed=0), _held_out(pipe, samples)
    if needs and calib_data is None:
        raise InvalidInput(f"this bundle's denoiser needs {needs}: record calibration feeds with `edgediff calibrate "
                           f"BUNDLE --{'prompt' if needs == 'prompts' else 'cond'} ... --out feeds.npz` and pass "
                           "--calib-data feeds.npz")
    if calib_data is not None:
        feeds = CalibrationFeeds.load(calib_data, list(m.inputs))
        check_feeds(feeds, m.inputs, calib_data)
        return _split(feeds)
    log(f"recording calibration feeds: {samples} trajectories, ≤ {cap} rows per step ...")
    calibration = record_feeds(pipe, samples=samples, cap=cap, seed=0)
    return calibration, _held_out(pipe, samples)


def _held_out(pipe, samples: int) -> CalibrationFeeds:
    """Trajectories of other seeds for the gate: a quarter of the calibration draws (≥ 4)."""
    return record_feeds(pipe, samples=max(4, samples // 4), cap=8, seed=HELD_OUT_SEED)


def check_feeds(feeds: CalibrationFeeds, inputs: dict[str, dict], path) -> None:
    """Feeds of another bundle fail here in one line, not inside ModelOpt or ONNX Runtime."""
    extra = sorted(set(feeds.arrays) - set(inputs))
    if extra:
        raise InvalidInput(f"{path} holds arrays this denoiser does not take: {', '.join(extra)}")
    for name, spec in inputs.items():       # the backends' own feed check, one input at a time
        arr = feeds.arrays[name]
        try:
            validate_feed({name: arr}, {name: spec})
        except BackendError:
            raise InvalidInput(f"{path}: {name!r} is {arr.dtype} {tuple(arr.shape)}; this denoiser takes "
                               f"{spec['dtype']} {spec['shape']}") from None


def _split(feeds: CalibrationFeeds) -> tuple[CalibrationFeeds, CalibrationFeeds]:
    """Given feeds only: every fourth row of each step is held out for the gate."""
    held = np.zeros(len(feeds), bool)
    for k in np.unique(feeds.step):
        rows = np.flatnonzero(feeds.step == k)
        if len(rows) < 4:
            raise InvalidInput(f"the calibration feeds hold {len(rows)} row(s) at step {int(k)}: at least 4 per step "
                               "are needed to hold one of four out for the gate (record them with a larger --cap)")
        held[rows[3::4]] = True
    return feeds.select(~held), feeds.select(held)


def add_int8(bundle_dir: str | Path, calib_samples: int = 64, calib_cap: int = 16, calib_data: str | Path | None = None,
             judge: Callable | None = None, log=print) -> tuple[ParityResult, object | None]:
    """Add ``model_int8.onnx`` to a bundle, gated; on failure leave the last model tried at
    BUNDLE.int8.failed. ``judge(bundle_dir, int8_backend)``: a sample-quality gate (an object
    with ``passed``, ``summary()``, ``to_dict()``; the CLI passes the digits judge's,
    digits/precision_gate.py, where it applies), run after the per-step gate holds."""
    from edgediff.runtime.pipeline import Pipeline

    bundle = read_bundle(bundle_dir)
    m, path = bundle.manifest, Path(bundle_dir)
    c = m.component("denoiser")
    fp32 = bundle.model_path("fp32")
    with Pipeline.from_bundle(bundle_dir, precision="fp32") as pipe:
        calibration, held_out = _feeds(pipe, calib_data, calib_samples, calib_cap, log)
    with OrtBackend(fp32, c.inputs, c.output_names, graph_outputs=c.graph_outputs) as reference, \
            staged_dir(path, "int8") as stage:
        out = stage.path / INT8_FILE
        log(f"quantizing to INT8 with ModelOpt ({len(calibration)} calibration rows) and checking every step "
            f"of {held_out.meta.get('samples', '?')} held-out trajectories against FP32 ...")
        try:
            final, trials, groups, reported = convert_int8(fp32, out, c, reference.infer, calibration, held_out,
                                                           m.time, log=log)
            gate = _quality(judge, bundle.path, out, c, log) if judge else None
            if gate is not None and not gate.passed:
                raise Int8Error(f"INT8 sample quality misses the gate: {gate.summary()}")
        except Int8Error as exc:
            if not out.exists():
                raise
            failed = stage.keep_failed(".int8.failed")
            raise Int8Error(f"{exc}; the last INT8 model tried is in {failed}") from None
        rec = record(onnx.load(str(fp32), load_external_data=False), final, trials, groups, calibration, held_out,
                     reported)
        if gate is not None:
            rec["quality"] = gate.to_dict()
        _install(bundle, stage.path, final.parity, rec, gate)
    return final.parity, gate


def _quality(judge, bundle_path: Path, model: Path, c, log):
    log("judging FP32 and INT8 samples ...")
    with OrtBackend(model, c.inputs, c.output_names, graph_outputs=c.graph_outputs,
                    int8=True) as backend:
        return judge(bundle_path, backend)


def _install(bundle, tmp: Path, parity: ParityResult, rec: dict, gate) -> None:
    from .bundle import install_into_bundle

    entry = parity.to_dict() | ({"quality": gate.to_dict()} if gate is not None else {})
    install_into_bundle(bundle, tmp, {"int8": entry}, replace_record(bundle.manifest, rec, parity, INT8_FILE))
