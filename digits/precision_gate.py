"""The sample-quality gate of a lower precision (`add-precision --precision int8`): FP32 and
the candidate draw the same 500 digits (the bundle's recommended sampling, same seeds), the
torch-free judge scores both; the candidate's accuracy must be within 2 points of FP32's and
its FD at most 1.25× FP32's. It lives beside the judge: export/ never imports digits/.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgediff.runtime.manifest import TEXT_CONTEXT

from .judge import JudgeResult, judge_backend, unjudgeable

QUALITY_PER_CLASS = 50           # 500 judged samples per precision
ACCURACY_POINTS = 2.0            # the candidate's judge accuracy within 2 points of FP32
FD_RATIO = 1.25                  # and its FD at most 1.25x FP32's


@dataclass
class QualityGate:
    """Sample quality of FP32 and of the candidate by the digits judge, same seeds."""
    fp32: JudgeResult
    int8: JudgeResult

    @property
    def passed(self) -> bool:
        return (100 * (self.fp32.accuracy - self.int8.accuracy) <= ACCURACY_POINTS + 1e-9   # 0.99 - 0.97 is 0.0200...02
                and self.int8.fd <= FD_RATIO * self.fp32.fd)

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (f"{verdict}: judge accuracy {100 * self.int8.accuracy:.1f}% vs FP32 {100 * self.fp32.accuracy:.1f}% "
                f"(≥ FP32 − {ACCURACY_POINTS:g} points), FD {self.int8.fd:.2f} vs {self.fp32.fd:.2f} "
                f"(≤ {FD_RATIO:g}×), n={self.int8.n}")

    def to_dict(self) -> dict:
        return {"fp32": self.fp32.to_dict(), "int8": self.int8.to_dict(), "passed": self.passed,
                "accuracy_points": ACCURACY_POINTS, "fd_ratio": FD_RATIO}


def judge_applies(manifest) -> bool:
    """The digits judge reads 1×16×16 digits drawn by class label (or unconditionally): not a
    text-conditioned model's, nor an undecoded latent model's."""
    if TEXT_CONTEXT in manifest.inputs or (manifest.space == "latent" and "decoder" not in manifest.components):
        return False
    return unjudgeable(manifest) is None


def quality_gate(bundle_dir: Path, candidate, per_class: int = QUALITY_PER_CLASS) -> QualityGate:
    """FP32 and ``candidate`` (a backend of the bundle's denoiser) samples, judged."""
    from edgediff.runtime.pipeline import Pipeline

    with Pipeline.from_bundle(bundle_dir, precision="fp32", max_batch=250) as pipe:
        return QualityGate(*(judge_backend(backend, pipe.manifest, per_class, batch=250, decoder=pipe.decoder)[0]
                             for backend in (pipe.backend, candidate)))
