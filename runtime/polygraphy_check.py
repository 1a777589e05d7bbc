"""Rung 4 through Polygraphy, the field's comparison tool (docs/architecture.md §6): its
runners and ``Comparator`` run the same feeds through two models and hold every output to a
per-output tolerance. Polygraphy's ``SnrCompareFunc`` is used because SNR is rel-L2 in
decibels (SNR = −20·log10(‖a − b‖ / ‖a‖)), so the ladder's rel-L2 gates carry over unchanged.

- ``--backend trt``: the TensorRT engine (Polygraphy's ``TrtRunner``) against the ONNX model
  of the same precision on ONNX Runtime (``OnnxrtRunner``);
- ``--backend ort``: ONNX Runtime FP32 against the candidate precision's ONNX, the same path
  on a CPU, so it is tested where no GPU is.

Polygraphy is optional (the ``fp16`` and ``gpu`` extras); it is imported only here.
"""
from __future__ import annotations

import math
from pathlib import Path

from .errors import EdgediffError

MISSING = "the Polygraphy check needs polygraphy: pip install 'edgediff[fp16]' (or a gpu-* extra)"


def snr_db(rel_l2_gate: float) -> float:
    """The SNR (dB) equal to a rel-L2 gate: rel-L2 ≤ g  ⟺  SNR ≥ −20·log10(g)."""
    return -20.0 * math.log10(rel_l2_gate)


def _onnx_runner(path: Path, name: str):
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    return OnnxrtRunner(SessionFromOnnx(str(path), providers=["CPUExecutionProvider"]), name=name)


def _trt_runner(engine_path: Path, name: str):
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    return TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path))), name=name)


def compare(reference: tuple[str, Path], candidate: tuple[str, Path], feeds: list[dict], outputs: list[str],
            gate_rel_l2: float, candidate_engine: bool = False) -> dict:
    """Run ``feeds`` through the reference ONNX and the candidate (ONNX, or a TensorRT engine
    when ``candidate_engine``) with Polygraphy's ``Comparator``; each of ``outputs`` (graph
    names) must reach SNR ≥ snr_db(gate). Returns the JSON record: pass, per-output worst SNR
    and its rel-L2 equivalent."""
    try:
        from polygraphy.comparator import Comparator, SnrCompareFunc
        from polygraphy.logger import G_LOGGER
    except ImportError:
        raise EdgediffError(MISSING) from None
    threshold = snr_db(gate_rel_l2)
    ref_name, ref_path = reference
    cand_name, cand_path = candidate
    runners = [_onnx_runner(ref_path, ref_name),
               _trt_runner(cand_path, cand_name) if candidate_engine else _onnx_runner(cand_path, cand_name)]
    severity = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.CRITICAL          # our table says it; Polygraphy's log would not fit one screen
    try:
        results = Comparator.run(runners, data_loader=feeds)
        accuracy = Comparator.compare_accuracy(
            results, compare_func=SnrCompareFunc(snr_threshold={name: threshold for name in outputs}))
    finally:
        G_LOGGER.module_severity = severity
    worst = {}
    for per_func in accuracy:
        for iterations in per_func.values():
            for per_output in iterations:
                for name, res in per_output.items():
                    worst[name] = min(worst.get(name, math.inf), float(res.snr))
    passed = bool(accuracy) and set(worst) >= set(outputs)
    summary = ", ".join(f"{n} SNR {v:.1f} dB (rel-L2 {10 ** (-v / 20):.2e})" for n, v in worst.items())
    return {"tool": "polygraphy Comparator + SnrCompareFunc", "runners": [ref_name, cand_name],
            "feeds": len(feeds), "snr_threshold_db": threshold, "passed": passed,
            "worst_snr_db": worst, "worst_rel_l2": {n: 10 ** (-v / 20) for n, v in worst.items()},
            "summary": f"{'PASS' if passed else 'FAIL'}: {summary} (gate SNR ≥ {threshold:.1f} dB)"}
