"""Check that each GPU extra of pyproject.toml resolves to one consistent stack (CI step).

For every ``gpu-*`` extra, ``pip install --dry-run --report --ignore-installed '.[EXTRA]'``
resolves the whole install from the package index (metadata only: no big wheel is
downloaded) and the report is checked: exactly one ONNX Runtime distribution (never
``onnxruntime`` beside ``onnxruntime-gpu``: they write the same package and leave only the
CPU provider), TensorRT, cuda-python and the CUDA runtime all of one CUDA major version.

TensorRT's ``tensorrt-cuXX-libs`` has no wheel on PyPI: its sdist is a stub that downloads the
real wheel from NVIDIA's own index at install time, which CI cannot reach. Its version is
pinned by ``tensorrt-cuXX`` (``==`` the same version), so the check puts a metadata-only
placeholder wheel of that exact version on ``--find-links`` and says so in its output; what
the libraries wheel itself depends on is therefore not resolved here.

Usage:  python scripts/gpu_resolve.py [EXTRA ...]     (default: every gpu-* extra)
Exit status 0: all consistent (or the index unreachable: skipped, with the reason); 1: a
problem, printed one line per extra.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORT = ("onnxruntime", "onnxruntime-gpu")
# What pip prints when it cannot reach the index (as opposed to a resolution conflict).
UNREACHABLE = re.compile(r"Name or service not known|NewConnectionError|Temporary failure in name resolution|"
                         r"Network is unreachable|Max retries exceeded|ConnectTimeout|ReadTimeout|"
                         r"from versions: none")   # none of a package that is on PyPI: no index reached


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def resolved(report: dict) -> dict[str, dict]:
    """name -> metadata of every distribution the dry run would install."""
    return {_norm(i["metadata"]["name"]): i["metadata"] for i in report["install"]}


def cuda_majors(dists: dict[str, dict]) -> dict[str, int]:
    """Which CUDA major version each GPU component of the resolution was built for."""
    majors = {}
    for name, meta in dists.items():
        suffix = re.fullmatch(r"(tensorrt|nvidia-[a-z-]+?)-cu(\d+)(-bindings|-libs)?", name)
        if suffix and (name.startswith("tensorrt") or name.startswith("nvidia-cuda-runtime")):
            majors[name] = int(suffix.group(2))
        elif name in ("cuda-python", "cuda-bindings", "nvidia-cuda-runtime"):
            majors[name] = int(meta["version"].split(".")[0])
    return majors


def check_report(report: dict) -> tuple[str, list[str]]:
    """(one-line summary of the resolved versions, problems) for one extra's pip report."""
    dists = resolved(report)
    problems = []
    ort = [n for n in ORT if n in dists]
    if len(ort) > 1:
        problems.append("onnxruntime and onnxruntime-gpu both resolve: they overwrite each other and "
                        "leave only the CPU provider")
    if "onnxruntime-gpu" not in dists:
        problems.append("no onnxruntime-gpu in the resolution")
    if not any(n.startswith("tensorrt") for n in dists):
        problems.append("no TensorRT in the resolution")
    if not any(n in dists for n in ("cuda-python", "cuda-bindings")):
        problems.append("no cuda-python in the resolution")
    majors = cuda_majors(dists)
    if len(set(majors.values())) > 1:
        problems.append("CUDA major versions disagree: " + ", ".join(f"{n} {m}" for n, m in sorted(majors.items())))
    shown = [n for n in dists if n in ORT or n.startswith("tensorrt") or n in ("cuda-python", "cuda-bindings")
             or n.startswith("nvidia-cuda-runtime")]
    cuda = "/".join(str(m) for m in sorted(set(majors.values()))) or "?"
    summary = ", ".join(f"{n} {dists[n]['version']}" for n in sorted(shown)) + f"; CUDA {cuda}"
    return summary, problems


def gpu_extras(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    return [e for e in extras if e.startswith("gpu-")]


def _pip(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)


def _error(proc: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in proc.stderr.splitlines()
             if ln.strip() and not ln.startswith("WARNING: Location")]
    errors = [ln for ln in lines if ln.startswith("ERROR")] or lines
    return errors[-1] if errors else f"pip exited {proc.returncode}"


def _placeholder(folder: Path, name: str, version: str) -> None:
    """A metadata-only wheel ``name==version`` (no files, no dependencies)."""
    dist = f"{name.replace('-', '_')}-{version}"
    info = f"{dist}.dist-info"
    files = {f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: gpu_resolve\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{p},,\n" for p in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as z:
        for path, text in files.items():
            z.writestr(path, text)


def _tensorrt_requirement(extra: str) -> str | None:
    reqs = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][extra]
    return next((r for r in reqs if re.match(r"tensorrt(-cu\d+)?\b", r)), None)


class Unreachable(Exception):
    pass


def resolve(extra: str, work: Path) -> dict:
    """The pip report of ``.[extra]`` (TensorRT's libraries wheel as a placeholder)."""
    links = work / f"links-{extra}"
    links.mkdir()
    req = _tensorrt_requirement(extra)
    if req:
        first = work / f"{extra}-tensorrt.json"
        proc = _pip("--no-deps", "--report", str(first), req)
        if proc.returncode:
            raise (Unreachable if UNREACHABLE.search(proc.stderr) else RuntimeError)(_error(proc))
        for meta in resolved(json.loads(first.read_text())).values():
            for dep in meta.get("requires_dist") or []:
                pin = re.fullmatch(r"(tensorrt[-_]cu\d+[-_]libs)\s*==\s*([\w.]+)", dep.strip())
                if pin:
                    _placeholder(links, _norm(pin.group(1)), pin.group(2))
    out = work / f"{extra}.json"
    proc = _pip("--find-links", str(links), "--report", str(out), f".[{extra}]")
    if proc.returncode:
        raise (Unreachable if UNREACHABLE.search(proc.stderr) else RuntimeError)(_error(proc))
    return json.loads(out.read_text())


def _check(extra: str, work: Path) -> tuple[str, list[str]]:
    try:
        return check_report(resolve(extra, work))
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        return "", [f"pip could not resolve it: {exc}"]


def main(argv: list[str]) -> int:
    extras = argv or gpu_extras()
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(len(extras)) as pool:   # network-bound
        try:
            results = list(pool.map(lambda e: _check(e, Path(tmp)), extras))
        except Unreachable as exc:
            print(f"gpu-resolve: SKIPPED (the package index is unreachable or lacks these packages: {exc})")
            return 0
    for extra, (summary, problems) in zip(extras, results):
        verdict = "OK" if not problems else "FAIL: " + "; ".join(problems)
        print(f"gpu-resolve [{extra}] {summary} -> {verdict}" if summary else f"gpu-resolve [{extra}] {verdict}")
    print("gpu-resolve: tensorrt-cu*-libs taken at tensorrt's pinned version (a placeholder: PyPI has only a "
          "stub that downloads it from NVIDIA's index)")
    return 1 if any(problems for _, problems in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
