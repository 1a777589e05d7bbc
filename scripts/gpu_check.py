"""``make gpu-check``: every digits family through every GPU stack importable here, one table.

For each family's digits bundle (build/digits-FAMILY, exported from the shipped weights when
missing or stale; FP16 added with ModelOpt when the fp16 extra is installed; INT8 when the
bundle has it) and each precision, on each usable stack:

  trt           the native backend: ``edgediff build``, ``edgediff parity --backend trt``
                (rung 4: the sampling run per forward against the FP32 ONNX on the CPU, and
                Polygraphy's comparison when installed), ``edgediff bench --backend trt``
  ort-cuda      ONNX Runtime's CUDA provider, and
  ort-tensorrt  its TensorRT provider: the same drift check in process (``edgediff parity``
                has no --device), timed with the same feeds at batch 1 and 8
  cupy          a square matmul as the GPU's yardstick (edgediff has no CuPy backend)

prints one table and, after it, exactly what was skipped and why. Sized for ≤ 8 minutes on an
H100/H200 (``--budget``, seconds: past it no new work starts and the rest is listed as
skipped). On a machine without a GPU every stack is skipped, with its reason, in seconds.
Exit status: 0 when nothing that ran failed (skips included), 1 otherwise.

Usage:  python scripts/gpu_check.py [--budget 420] [--families ddpm,dit] [--json build/gpu-check.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STACKS = ("trt", "ort-cuda", "ort-tensorrt", "cupy")
PRECISIONS = ("fp32", "fp16", "int8")
N_PARITY = 8                        # samples in the drift check (engine batch 16 when guided)
BATCHES = (1, 8)


@dataclass
class Row:
    family: str
    precision: str
    stack: str
    parity: str = "-"               # "1.2e-04 ≤ 5e-03" or the failure
    ms: dict = field(default_factory=dict)     # batch -> p50 ms
    verdict: str = "PASS"           # PASS / FAIL / ERROR
    note: str = ""


@dataclass
class Check:
    gpu: str = ""
    stacks: dict = field(default_factory=dict)   # stack -> None (usable) or why not
    rows: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # "what: why"
    started: float = field(default_factory=time.monotonic)
    budget: float = 420.0
    out: Path = ROOT / "build" / "gpu-check"     # bench reports

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.started)

    def skip(self, what: str, why: str) -> None:
        self.skipped.append(f"{what}: {why}")


# --- what is here -------------------------------------------------------------------------

def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def detect_gpu() -> tuple[str, str | None]:
    """(description, None) of CUDA device 0 through cuda-python, or ("", why not)."""
    from edgediff.runtime.backends.trt import cudart, device_info

    try:
        rt = cudart()
        err, count = rt.cudaGetDeviceCount()
        if int(err) != 0 or count == 0:
            return "", f"no CUDA device (cudaGetDeviceCount: error {int(err)}, {count} devices)"
        info = device_info(0)
        return f"{info['name']} (sm {info['compute_capability']}, {count} device(s))", None
    except Exception as exc:            # BackendError when not installed; CUDA's own errors otherwise
        return "", _first_line(exc)


def detect(gpu_reason: str | None) -> dict[str, str | None]:
    """stack -> None when usable, else the reason it is skipped."""
    stacks: dict[str, str | None] = {}
    try:
        from edgediff.runtime.backends.trt import import_tensorrt
        import_tensorrt()
        stacks["trt"] = gpu_reason and f"no GPU through cuda-python: {gpu_reason}"
    except Exception as exc:
        stacks["trt"] = _first_line(exc)
    try:
        from edgediff.runtime.backends.ort import import_onnxruntime
        providers = import_onnxruntime("cuda").get_available_providers()
        for stack, provider in (("ort-cuda", "CUDAExecutionProvider"), ("ort-tensorrt", "TensorrtExecutionProvider")):
            stacks[stack] = None if provider in providers else (
                f"this onnxruntime has no {provider} (has {', '.join(providers)}): install a gpu-* extra")
    except Exception as exc:
        stacks["ort-cuda"] = stacks["ort-tensorrt"] = _first_line(exc)
    try:
        import cupy
        count = cupy.cuda.runtime.getDeviceCount()
        stacks["cupy"] = None if count else "CuPy sees no CUDA device"
    except ImportError:
        stacks["cupy"] = "CuPy is not installed"
    except Exception as exc:
        stacks["cupy"] = f"CuPy cannot reach a GPU: {_first_line(exc)}"
    return stacks


# --- bundles ------------------------------------------------------------------------------

def families() -> list[str]:
    from edgediff.digits.data import DIGITS_CONFIGS
    return list(DIGITS_CONFIGS)


def _cli(*args: str, timeout: float) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("edgediff")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-c", "from edgediff.entry import main; main()"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=max(timeout, 1), cwd=ROOT)


def bundle_for(family: str, check: Check) -> tuple[Path | None, list[str]]:
    """The family's digits bundle and its precisions to check (each missing one listed as skipped)."""
    from edgediff.digits.demo import ensure_bundle, shipped
    from edgediff.runtime.bundle import read_bundle

    path = ROOT / "build" / f"digits-{family}"
    try:
        ensure_bundle(family, path, log=lambda m: None)
    except Exception as exc:
        check.skip(f"{family} (all)", f"no bundle: {_first_line(exc)}")
        return None, []
    models = read_bundle(path).manifest.models
    if "fp16" not in models:
        import importlib.util
        if importlib.util.find_spec("modelopt") is None:
            check.skip(f"{family} fp16", "the bundle has no FP16 model and ModelOpt (the fp16 extra) is not installed")
        else:
            weights = shipped(family) / "model.safetensors"
            res = _cli("add-precision", str(path), "--precision", "fp16", "--checkpoint", str(weights),
                       timeout=min(check.left(), 300))
            if res.returncode:
                last = (res.stderr.strip().splitlines() or ["?"])[-1]
                check.skip(f"{family} fp16", f"edgediff add-precision failed: {last}")
        models = read_bundle(path).manifest.models
    if "int8" not in models:
        check.skip(f"{family} int8", "the bundle has no INT8 model (INT8 calibration adds it)")
    return path, [p for p in PRECISIONS if p in models]


# --- the stacks ---------------------------------------------------------------------------

def run_native(path: Path, family: str, precision: str, check: Check) -> Row:
    row = Row(family, precision, "trt")
    build = _cli("build", str(path), "--precision", precision, "--opt-batch", "8", "--max-batch", "8",
                 timeout=min(check.left(), 300))
    if build.returncode:
        return _error(row, "edgediff build", build)
    parity = _cli("parity", str(path), "--precision", precision, "--backend", "trt", "-n", str(N_PARITY),
                  "--json-only", timeout=min(check.left(), 240))
    try:
        report = json.loads(parity.stdout)
    except ValueError:
        return _error(row, "edgediff parity", parity)
    _parity(row, report["passed"], max(report["worst"].values(), default=0.0), report["gate"]["per_forward_rel_l2"],
            report["failures"])
    poly = report.get("checks", {}).get("polygraphy", {})
    row.note = f"polygraphy: {poly.get('summary') or 'skipped: ' + poly.get('skipped', '?')}" if poly else ""
    out = check.out / f"bench-{family}-{precision}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    bench = _cli("bench", str(path), "--precision", precision, "--backend", "trt", "--batch",
                 ",".join(map(str, BATCHES)), "--repeats", "10", "--json", str(out), timeout=min(check.left(), 240))
    if bench.returncode:
        return _error(row, "edgediff bench", bench)
    batches = json.loads(out.read_text())["engines"]["trt"]["batches"]
    row.ms = {b: batches.get(str(b), batches.get(b, {})).get("p50") for b in BATCHES}
    return row


def run_ort(path: Path, family: str, precision: str, stack: str) -> Row:
    """The drift check of `edgediff parity` with ONNX Runtime's GPU provider as the candidate."""
    from edgediff.runtime.backends import load_backend
    from edgediff.runtime.bundle import read_bundle
    from edgediff.runtime.drift import component_feed, denoiser_drift, gate_for
    from edgediff.runtime.engines import engine_batch
    from edgediff.runtime.manifest import FEATURE_COMPONENT, TEXT_CONTEXT

    row = Row(family, precision, stack)
    device = stack.split("-", 1)[1]
    bundle = read_bundle(path)
    m = bundle.manifest
    opened = []
    try:
        ref = load_backend(bundle, "ort", "fp32")
        cand = load_backend(bundle, "ort", precision, device=device, max_batch=engine_batch(N_PARITY, m.guidable))
        opened += [ref, cand]
        decoder = load_backend(bundle, "ort", "fp32", component="decoder") if "decoder" in m.components else None
        encoder = (load_backend(bundle, "ort", "fp32", component=FEATURE_COMPONENT)
                   if FEATURE_COMPONENT in m.components else None)
        opened += [decoder, encoder]
        conditions = None
        if TEXT_CONTEXT in m.inputs:
            from edgediff.cli_parity import _text_conditions
            conditions, _ = _text_conditions(path, N_PARITY, (), None, None)
        report = denoiser_drift(m, ref, cand, n=N_PARITY, decoder=decoder, cond_encoder=encoder, conditions=conditions,
                                gate=gate_for(precision), names=("onnx-fp32 (cpu)", f"{stack}-{precision}"))
        _parity(row, report.passed, report.worst_rel_l2, report.gate_rel_l2, report.failures)
        rng = np.random.default_rng(0)
        for b in BATCHES:
            feed = component_feed(m.component("denoiser"), engine_batch(b, m.guidable), rng)
            row.ms[b] = _time(lambda: cand.infer(feed))
    except Exception as exc:
        row.verdict, row.note = "ERROR", _first_line(exc)
    finally:
        for b in opened:
            if b is not None:
                b.close()
    return row


def run_cupy() -> list[Row]:
    import cupy

    rows = []
    for dtype, precision in ((cupy.float32, "fp32"), (cupy.float16, "fp16")):
        a = cupy.random.standard_normal((4096, 4096)).astype(dtype)
        def matmul():
            (a @ a).sum().item()                  # .item(): waits for the GPU
        ms = _time(matmul)
        rows.append(Row("sgemm 4096³", precision, "cupy", ms={1: ms},
                        note=f"{2 * 4096 ** 3 / ms / 1e9:.1f} TFLOP/s (yardstick, not a model)"))
    return rows


def _time(call, warmup: int = 3, repeats: int = 10) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def _parity(row: Row, passed: bool, worst: float, gate: float, failures: list[str]) -> None:
    row.parity = f"{worst:.1e} ≤ {gate:g}" if passed else (failures[0] if failures else f"{worst:.1e} > {gate:g}")
    row.verdict = "PASS" if passed else "FAIL"


def _error(row: Row, what: str, proc: subprocess.CompletedProcess) -> Row:
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    row.verdict, row.note = "ERROR", f"{what} exited {proc.returncode}: {lines[-1] if lines else ''}"
    return row


# --- the run ------------------------------------------------------------------------------

def run(check: Check, wanted: list[str] | None = None) -> Check:
    check.gpu, gpu_reason = detect_gpu()
    check.gpu = check.gpu or f"no GPU seen through cuda-python ({gpu_reason})"
    check.stacks = detect(gpu_reason)
    for stack, why in check.stacks.items():
        if why:
            check.skip(stack, why)
    if check.stacks["cupy"] is None:
        check.rows += run_cupy()
    model_stacks = [s for s in ("trt", "ort-cuda", "ort-tensorrt") if check.stacks[s] is None]
    names = wanted or families()
    if not model_stacks:
        check.skip(f"families ({', '.join(names)})", "no stack that runs models is usable here")
        return check
    bundles = {}
    for family in names:
        if check.left() <= 0:
            check.skip(family, f"the time budget ({check.budget:.0f} s) was spent")
        else:
            bundles[family] = bundle_for(family, check)
    # Precision-major, FP16 (what is deployed) first: a spent budget cuts whole precisions last.
    for precision in ("fp16", "fp32", "int8"):
        for family, (path, precisions) in bundles.items():
            for stack in model_stacks if precision in precisions else ():
                if check.left() <= 0:
                    check.skip(f"{family} {precision} {stack}", f"the time budget ({check.budget:.0f} s) was spent")
                elif stack == "trt":
                    check.rows.append(run_native(path, family, precision, check))
                else:
                    check.rows.append(run_ort(path, family, precision, stack))
    return check


def table(check: Check) -> str:
    head = f"{'family':<12} {'prec':<5} {'stack':<13} {'parity (worst rel-L2 ≤ gate)':<30} " \
           + " ".join(f"{f'b{b} ms':>8}" for b in BATCHES) + f" {'verdict':<7} note"
    lines = [f"gpu-check on {check.gpu} ({time.monotonic() - check.started:.0f} s)", head]
    for r in check.rows:
        ms = " ".join(f"{r.ms[b]:>8.2f}" if r.ms.get(b) is not None else f"{'-':>8}" for b in BATCHES)
        lines.append(f"{r.family:<12} {r.precision:<5} {r.stack:<13} {r.parity:<30} {ms} {r.verdict:<7} {r.note}")
    if not check.rows:
        lines.append("(nothing ran: all skipped)")
    lines.append(f"skipped ({len(check.skipped)}):")
    lines += [f"  {s}" for s in check.skipped]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=420.0, help="Seconds after which no new work starts.")
    ap.add_argument("--families", help="Comma-separated digits families (default: all).")
    ap.add_argument("--json", dest="json_path", help="Also write the rows and skips as JSON here.")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "4")
    check = run(Check(budget=args.budget), args.families.split(",") if args.families else None)
    print(table(check))
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps({"gpu": check.gpu, "stacks": check.stacks,
                                                    "rows": [asdict(r) for r in check.rows],
                                                    "skipped": check.skipped}, indent=2))
    return 1 if any(r.verdict != "PASS" for r in check.rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
