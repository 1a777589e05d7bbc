"""Lay out the real TensorRT and cuda-python Python bindings, importable on a CPU, for the
name check (tests/runtime/test_trt_names.py).

Each set goes to its own folder under ``build/bindings/`` with ``pip install --target
--no-deps`` (metadata and wheels from the package index; about 75 MB in all, cached: a
folder that is complete is not fetched again):

  tensorrt-10.12.0.36   tensorrt-cu12-bindings (the oldest TensorRT edgediff accepts)
  tensorrt-10.16.1.11   tensorrt-cu13-bindings (what the gpu-cu12/gpu-cu13 extras resolve to)
  tensorrt-11.4.0.106   tensorrt-cu13-bindings (the gpu-cu13-trt11 extra)
  cuda-12.9.10          cuda-bindings 12 (+ cuda-pathfinder)
  cuda-13.4.4           cuda-bindings 13 (+ cuda-pathfinder)
  stub/                 libnvinfer.so.N, libnvonnxparser.so.N, libnvinfer_plugin.so.N (N = 10, 11)

The bindings' ``tensorrt.so`` links TensorRT's libraries, which are GPU-sized and not needed
to read its classes: it calls only a few C factory functions from them (TensorRT's API is
C++ interfaces behind those), so one small shared library defining them, built with ``cc``
and copied under each soname, lets ``import tensorrt_bindings`` succeed; nothing in it runs.
cuda-bindings loads the CUDA driver only on the first call, so it imports as it is.

Usage:  python scripts/trt_bindings.py [--ort-gpu] [ROOT]      (default: build/bindings)
Prints one line; exit 0 when ready, or when the index is unreachable (then ROOT/UNAVAILABLE
says why, and the test skips with that reason); 1 on any other failure.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name -> the requirements pip installs into it
SETS = {
    "tensorrt-10.12.0.36": ["tensorrt-cu12-bindings==10.12.0.36"],
    "tensorrt-10.16.1.11": ["tensorrt-cu13-bindings==10.16.1.11"],
    "tensorrt-11.4.0.106": ["tensorrt-cu13-bindings==11.4.0.106"],
    "cuda-12.9.10": ["cuda-bindings==12.9.10", "cuda-pathfinder==1.9.1"],
    "cuda-13.4.4": ["cuda-bindings==13.4.4", "cuda-pathfinder==1.9.1"],
}
# Opt-in (--ort-gpu, 434 MB unpacked): the real onnxruntime-gpu wheel, whose silent fallback
# to the CPU without CUDA libraries test_ort_install.py shows being refused.
ORT_GPU = {"onnxruntime-gpu-1.26.0": ["onnxruntime-gpu==1.26.0"]}
# (TensorRT set, cuda-python set): the pairs a user's install can have
PAIRS = [("tensorrt-10.12.0.36", "cuda-12.9.10"), ("tensorrt-10.16.1.11", "cuda-13.4.4"),
         ("tensorrt-11.4.0.106", "cuda-13.4.4")]
# The C functions tensorrt.so takes from libnvinfer / libnvonnxparser / libnvinfer_plugin.
STUB_C = "\n".join(f"void *{name}(void) {{ return 0; }}" for name in (
    "createInferBuilder_INTERNAL", "createInferRefitter_INTERNAL", "createInferRuntime_INTERNAL",
    "createNvOnnxParserRefitter_INTERNAL", "createNvOnnxParser_INTERNAL", "getBuilderPluginRegistry",
    "getNvOnnxParserVersion", "getPluginRegistry", "initLibNvInferPlugins")) + "\n"
UNREACHABLE = re.compile(r"Name or service not known|NewConnectionError|Temporary failure in name resolution|"
                         r"Network is unreachable|Max retries exceeded|ConnectTimeout|ReadTimeout|"
                         r"from versions: none")   # none of a package that is on PyPI: no index reached


class Unreachable(Exception):
    pass


def _install(folder: Path, reqs: list[str]) -> None:
    if (folder / ".complete").is_file():
        return
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile", "--target", str(tmp), *reqs]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING: Location")]
        raise (Unreachable if UNREACHABLE.search(proc.stderr) else RuntimeError)(
            f"pip install {' '.join(reqs)}: {lines[-1] if lines else proc.returncode}")
    (tmp / ".complete").write_text(" ".join(reqs) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _stub(folder: Path) -> None:
    names = [f"{lib}.so.{major}" for lib in ("libnvinfer", "libnvonnxparser", "libnvinfer_plugin") for major in (10, 11)]
    if all((folder / n).is_file() for n in names):
        return
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stub.c").write_text(STUB_C)
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc) to build the stub TensorRT libraries")
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(folder / "libstub.so"), str(folder / "stub.c")], check=True)
    for n in names:
        shutil.copyfile(folder / "libstub.so", folder / n)


def ensure(root: Path, sets: dict = SETS) -> Path:
    """Lay out every set under ``root`` (one process at a time: test workers may race);
    raise Unreachable when the index cannot be reached."""
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        for name, reqs in sets.items():
            _install(root / name, reqs)
        _stub(root / "stub")
        (root / "UNAVAILABLE").unlink(missing_ok=True)
    return root


def main(argv: list[str]) -> int:
    sets = {**SETS, **ORT_GPU} if "--ort-gpu" in argv else SETS
    argv = [a for a in argv if a != "--ort-gpu"]
    root = Path(argv[0]) if argv else ROOT / "build" / "bindings"
    try:
        ensure(root, sets)
    except Unreachable as exc:
        root.mkdir(parents=True, exist_ok=True)
        (root / "UNAVAILABLE").write_text(f"the package index is unreachable or lacks these packages ({exc})\n")
        print(f"trt-bindings: SKIPPED, the package index is unreachable or lacks these packages ({exc})")
        return 0
    except (RuntimeError, subprocess.SubprocessError) as exc:
        print(f"trt-bindings: FAILED: {exc}")
        return 1
    print(f"trt-bindings: ready in {root} ({', '.join(sets)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
