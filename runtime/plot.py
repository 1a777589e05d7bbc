"""The drift plot of `edgediff parity`: rel-L2 against t per output, log scale (matplotlib, the
optional ``plot`` extra; imported only when a plot is drawn)."""
from __future__ import annotations

from pathlib import Path

from .files import write_atomic


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def _series(report) -> dict[str, tuple[list, list]]:
    """name -> (x, rel-L2): every output per forward (lockstep), and x_t / the x0 estimate per
    step of the free-running candidate; x is t for the denoiser, the case for a component."""
    series: dict[str, tuple[list, list]] = {}
    for step in report.steps:
        for fw in step.get("forwards", []):
            x = fw["t"] if fw["t"] is not None else step["i"]
            checks = {**{f"{n} (forward)": c for n, c in fw["outputs"].items()},
                      **({"x0 (forward)": fw["x0"]} if "x0" in fw else {})}
            for name, c in checks.items():
                series.setdefault(name, ([], []))
                series[name][0].append(x)
                series[name][1].append(c["rel_l2"])
        for key, label in (("x_t", "x_t (trajectory)"), ("x0_estimate", "x0 estimate (trajectory)")):
            if key in step:
                series.setdefault(label, ([], []))
                series[label][0].append(step["t"])
                series[label][1].append(step[key]["rel_l2"])
    return series


def drift_plot(report, path: str | Path, title: str) -> None:
    """Write the PNG atomically at ``path``."""
    import matplotlib

    matplotlib.use("Agg")                  # no display: files only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    tiny = 1e-12                           # log scale: an exact match is drawn at the floor
    for name, (x, y) in _series(report).items():
        ax.plot(x, [max(v, tiny) for v in y], marker="." if len(x) < 60 else None,
                linestyle="--" if "trajectory" in name else "-", label=name)
    ax.axhline(report.gate_rel_l2, color="red", linewidth=0.8,
               label=f"gate {report.gate_rel_l2:g} (model outputs, per forward)")
    ax.set_yscale("log")
    ax.set_xlabel("t (model time)" if report.kind == "denoiser" else "case")
    ax.set_ylabel("rel-L2 vs reference")
    if report.kind == "denoiser":
        ax.invert_xaxis()                  # sampling runs from high t to low t
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
