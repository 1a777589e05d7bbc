"""Numeric comparison of output dicts, with a result object that says pass or fail."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import InvalidInput


def rel_l2(ref: np.ndarray, got: np.ndarray) -> float:
    """‖got − ref‖₂ / ‖ref‖₂ in float64 (0 when both are zero)."""
    ref = np.asarray(ref, dtype=np.float64)
    diff = np.linalg.norm(np.asarray(got, dtype=np.float64) - ref)
    norm = np.linalg.norm(ref)
    return float(diff / norm) if norm > 0 else float(diff)


@dataclass
class OutputCheck:
    name: str
    rel_l2: float
    max_abs: float
    finite: bool
    mismatch: str | None = None          # why the shapes differ; None when they agree

    @classmethod
    def compare(cls, name: str, ref, got) -> "OutputCheck":
        ref, got = np.asarray(ref), np.asarray(got)
        finite = bool(np.isfinite(got).all())
        if ref.shape != got.shape:
            # no numbers to compare (broadcasting would compare the wrong elements or raise)
            why = f"{name}: shape {tuple(got.shape)} differs from the reference's {tuple(ref.shape)}"
            return cls(name, float("inf"), float("inf"), finite, why)
        max_abs = float(np.max(np.abs(got.astype(np.float64) - ref), initial=0.0))
        return cls(name, rel_l2(ref, got), max_abs, finite)


@dataclass
class ParityCase:
    label: str
    checks: list[OutputCheck]


@dataclass
class ParityResult:
    """Outcome of comparing a candidate against a reference over several cases."""

    reference: str
    candidate: str
    gate_rel_l2: float
    gate_max_abs: float | None
    cases: list[ParityCase] = field(default_factory=list)

    @property
    def worst_rel_l2(self) -> float:
        return max((c.rel_l2 for case in self.cases for c in case.checks), default=0.0)

    @property
    def worst_max_abs(self) -> float:
        return max((c.max_abs for case in self.cases for c in case.checks), default=0.0)

    @property
    def mismatches(self) -> list[str]:
        """Shape mismatches as 'case: output: shape ... differs ...' (empty when none)."""
        return [f"{case.label}: {c.mismatch}" for case in self.cases for c in case.checks if c.mismatch]

    @property
    def passed(self) -> bool:
        finite = all(c.finite for case in self.cases for c in case.checks)
        abs_ok = self.gate_max_abs is None or self.worst_max_abs <= self.gate_max_abs
        return (bool(self.cases) and finite and not self.mismatches and self.worst_rel_l2 <= self.gate_rel_l2
                and abs_ok)

    def add(self, label: str, ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> ParityCase:
        missing = sorted(set(ref) - set(got))
        if missing:
            raise InvalidInput(f"candidate lacks output(s): {', '.join(missing)}")
        checks = [OutputCheck.compare(n, ref[n], got[n]) for n in ref]
        case = ParityCase(label, checks)
        self.cases.append(case)
        return case

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        gate = f"rel-L2 ≤ {self.gate_rel_l2:g}" + (f", max-abs ≤ {self.gate_max_abs:g}" if self.gate_max_abs else "")
        text = (f"{verdict}: {self.candidate} vs {self.reference} over {len(self.cases)} cases: "
                f"worst rel-L2 {self.worst_rel_l2:.2e}, worst max-abs {self.worst_max_abs:.2e} ({gate})")
        bad = self.mismatches
        return text + (f"; shape mismatch in {len(bad)} check(s), first {bad[0]}" if bad else "")

    def to_dict(self) -> dict:
        return {"passed": self.passed, "worst_rel_l2": self.worst_rel_l2,
                "worst_max_abs": self.worst_max_abs, **asdict(self)}
