"""`edgediff parity`: where a bundle's lower precision or other backend drifts from its FP32
ONNX model, per forward and per sampler step (runtime/drift.py); JSON into BUNDLE/parity/,
a plot beside it, a one-screen table, and a non-zero exit past the ladder's gate."""
from __future__ import annotations

import json
import math

import click
import numpy as np

from edgediff.cli_precision import COMPONENTS
from edgediff.runtime.errors import EdgediffError
from edgediff.runtime.samplers import SAMPLERS

TABLE_ROWS = 24          # steps shown on stdout (evenly spread, first and last kept); the JSON has all


class ParityGateError(EdgediffError):
    """The candidate is past the parity ladder's gate."""


def _shown(count: int, rows: int = TABLE_ROWS) -> list[int]:
    if count <= rows:
        return list(range(count))
    return sorted({round(k * (count - 1) / (rows - 1)) for k in range(rows)})


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2e}"


def table(report) -> list[str]:
    """One screen: per step the worst per-forward rel-L2 of each output (and of x0), then the
    free-running trajectory's x_t and x0-estimate rel-L2."""
    names = report.output_names
    traj = [k for k in ("x_t", "x0_estimate") if any(k in s for s in report.steps)]
    head = ["step" if report.kind == "denoiser" else "case", "t", *[f"{n} fwd" for n in names],
            *[f"{k.replace('_estimate', '')} traj" for k in traj]]
    lines = ["  ".join(f"{h:>10}" for h in head)]
    for k in _shown(len(report.steps)):
        step = report.steps[k]
        fws = step.get("forwards", [])

        def worst(name):
            vals = [(fw.get("x0") if name == "x0" else fw["outputs"].get(name)) for fw in fws]
            vals = [v["rel_l2"] for v in vals if v is not None]
            return max(vals) if vals else None
        t = step["t"] if step["t"] is not None else (fws[0]["t"] if fws else None)
        cells = [str(step["i"] + 1), "-" if t is None else f"{t:.4g}", *[_fmt(worst(n)) for n in names],
                 *[_fmt(step[k]["rel_l2"] if k in step else None) for k in traj]]
        lines.append("  ".join(f"{c:>10}" for c in cells))
    if len(report.steps) > TABLE_ROWS:
        lines.append(f"({TABLE_ROWS} of {len(report.steps)} rows; all are in the JSON)")
    return lines


def _judge(report, manifest) -> dict | None:
    """Digits bundles (1×16×16 samples, 10 classes or unconditional): the digits judge's accuracy
    and FD for the reference's and the candidate's final images (imported only then). Not for
    image-conditioned bundles: their seeded random conditions make no digits to judge."""
    from edgediff.runtime.conditions import COND_COMPONENT

    if report.images is None or COND_COMPONENT in manifest.components:
        return None
    ref, got = report.images
    if tuple(ref.shape[1:]) != (1, 16, 16) or len(ref) < 2 or (manifest.conditional and manifest.num_classes != 10):
        return None
    from edgediff.digits.judge import judge

    out = {}
    for side, images in (("reference", ref), ("candidate", got)):
        r = judge(images, report.labels)
        out[side] = {"accuracy": r.accuracy, "fd": r.fd, "n": r.n}
    return out


def _backends(bundle, component, backend, precision, n, threads):
    from edgediff.runtime.backends import load_backend
    from edgediff.runtime.engines import engine_batch

    batch = engine_batch(n, bundle.manifest.guidable) if component == "denoiser" else n
    ref = load_backend(bundle, "ort", "fp32", component=component, threads=threads)
    cand = load_backend(bundle, backend, precision, component=component, threads=threads, max_batch=batch)
    return ref, cand


def _companion(bundle, name, threads):
    from edgediff.runtime.backends import load_backend

    if name not in bundle.manifest.components:
        return None
    return load_backend(bundle, "ort", "fp32", component=name, threads=threads)


DEFAULT_PROMPTS = tuple(f"the digit {d}" for d in range(10))


def _text_conditions(bundle_dir, n, prompts, guidance, threads):
    """Text-to-image bundles: the prompts (cycled over the n samples) and, when guiding, the
    empty prompt, encoded once by the bundle's FP32 text encoder, fed alike to both sides."""
    from edgediff.runtime.conditions import ConditionFeatures
    from edgediff.runtime.manifest import TEXT_CONTEXT
    from edgediff.runtime.pipeline import Pipeline, resolve_settings

    with Pipeline.from_bundle(bundle_dir, threads=threads, verify=False) as pipe:
        prompts = list(prompts) or list(DEFAULT_PROMPTS)
        context = pipe.encode_prompts(prompts)                                  # (K, L, D)
        guided = resolve_settings(pipe.manifest, guidance=guidance).guidance != 1.0
        null = {TEXT_CONTEXT: pipe.encode_prompts([""])} if guided else None
    index = np.arange(n, dtype=np.int64) % len(prompts)
    return ConditionFeatures({TEXT_CONTEXT: context}, index, null), prompts


def _polygraphy(bundle, component, backend, precision, cand, report) -> dict:
    """Rung 4 through Polygraphy on a few of the compared feeds (runtime/polygraphy_check.py)."""
    from importlib.util import find_spec

    from edgediff.runtime.polygraphy_check import compare

    if find_spec("polygraphy") is None:
        return {"skipped": "polygraphy is not installed (pip install 'edgediff[fp16]')", "passed": True}
    feeds = [report.feeds[k] for k in sorted({0, len(report.feeds) // 2, len(report.feeds) - 1})]
    c = bundle.manifest.component(component)
    graph = [c.graph_outputs.get(n, n) for n in c.output_names]
    if backend == "trt":      # rung 4 proper: the engine against the ONNX of its own precision
        reference = (f"onnx-{precision} (onnxruntime)", bundle.model_path(precision, component))
        candidate, engine = (f"trt-{precision}", cand.engine_path), True
    else:
        reference = ("onnx-fp32 (onnxruntime)", bundle.model_path("fp32", component))
        candidate, engine = (f"onnx-{precision} (onnxruntime)", bundle.model_path(precision, component)), False
    return compare(reference, candidate, feeds, graph, report.gate_rel_l2, candidate_engine=engine)


def run_parity(bundle_dir, precision, backend, component, sampler, steps, seed, n, guidance, threads, polygraphy,
               prompts=()):
    from edgediff.runtime.bundle import read_bundle
    from edgediff.runtime.drift import component_drift, denoiser_drift, gate_for
    from edgediff.runtime.manifest import FEATURE_COMPONENT, TEXT_CONTEXT

    if backend == "ort" and precision == "fp32":
        raise click.UsageError("the reference is FP32 on ONNX Runtime: choose --precision fp16/int8 or --backend trt")
    bundle = read_bundle(bundle_dir)
    m = bundle.manifest
    text = component == "denoiser" and TEXT_CONTEXT in m.inputs
    if prompts and not text:
        raise click.UsageError("--prompt is for a text-to-image bundle's denoiser")
    conditions, prompts = _text_conditions(bundle_dir, n, prompts, guidance, threads) if text else (None, None)
    gate = gate_for(precision)
    names = ("onnx-fp32 (onnxruntime)", f"{backend}-{precision}")
    ref, cand = _backends(bundle, component, backend, precision, n, threads)
    opened = [ref, cand]
    try:
        if component == "denoiser":
            decoder = _companion(bundle, "decoder", threads) if m.space == "latent" else None
            encoder = _companion(bundle, FEATURE_COMPONENT, threads)
            opened += [decoder, encoder]
            report = denoiser_drift(m, ref, cand, n=n, sampler=sampler, steps=steps, guidance=guidance, seed=seed,
                                    decoder=decoder, cond_encoder=encoder, conditions=conditions, gate=gate,
                                    names=names)
            if prompts is not None:
                report.settings["prompts"] = [prompts[i] for i in conditions.index]
                if prompts == list(DEFAULT_PROMPTS):          # digit prompts: the judge checks the digits
                    report.labels = conditions.index % 10
            judged = _judge(report, m)
            if judged:
                report.final["judge"] = judged
        else:
            report = component_drift(m.component(component), ref, cand, cases=max(n, 1), seed=seed, gate=gate,
                                     names=names)
        if polygraphy:
            report.checks["polygraphy"] = _polygraphy(bundle, component, backend, precision, cand, report)
    finally:
        for backend_ in opened:
            if backend_ is not None:
                backend_.close()
    return bundle, report


def _final_lines(report) -> list[str]:
    f = report.final
    lines = []
    if "samples" in f:
        img = f["images"]
        lines.append(f"final: samples rel-L2 {f['samples']['rel_l2']:.2e}; {'decoded ' if img['decoded'] else ''}"
                     f"images max-abs {img['max_abs']:.2e}, PSNR {img['psnr_db']:.1f} dB")
    if "judge" in f:
        r, c = f["judge"]["reference"], f["judge"]["candidate"]
        lines.append(f"digits judge (n={r['n']}): accuracy {100 * r['accuracy']:.1f}% -> {100 * c['accuracy']:.1f}%, "
                     f"FD {r['fd']:.2f} -> {c['fd']:.2f}")
    for name, check in report.checks.items():
        lines.append(f"{name}: {check.get('summary') or 'skipped: ' + check.get('skipped', '')}")
    return lines


def _write(bundle, report, stem: str, plot: bool) -> list[str]:
    from edgediff.runtime.files import write_json_atomic

    out = bundle.path / "parity"
    out.mkdir(exist_ok=True)
    written = [str(out / f"{stem}.json")]
    write_json_atomic(written[0], _json_safe(report.to_dict()))
    if plot:
        from edgediff.runtime import plot as plots

        if plots.available():
            written.append(str(out / f"{stem}.png"))
            plots.drift_plot(report, written[1], f"{bundle.path.name}: {report.candidate} vs {report.reference}")
    return written


def _json_safe(value):
    """inf/NaN as strings: strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


@click.command("parity")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--precision", default="fp16", show_default=True, type=click.Choice(["fp32", "fp16", "int8"]),
              help="The candidate's model (fp32 only with --backend trt).")
@click.option("--backend", default="ort", show_default=True, type=click.Choice(["ort", "trt"]),
              help="The candidate's backend; the reference is always the FP32 ONNX on ONNX Runtime (CPU).")
@click.option("--component", default="denoiser", show_default=True, type=click.Choice(COMPONENTS),
              help="The denoiser (compared through a whole sampling run) or a companion (per forward on "
                   "seeded inputs).")
@click.option("--sampler", type=click.Choice(list(SAMPLERS)), help="Sampler (default: the bundle's recommended one).")
@click.option("--steps", type=click.IntRange(1, 1000), help="Sampler steps (default: the bundle's recommended).")
@click.option("--guidance", type=float, help="Classifier-free guidance scale w (default: the bundle's recommended).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0),
              help="Seed of x_T, the noise and the inputs.")
@click.option("-n", "num", default=10, show_default=True, type=click.IntRange(1, 4096),
              help="Samples (denoiser; labels cycle over the classes) or input draws (components).")
@click.option("--threads", type=click.IntRange(1), help="ONNX Runtime intra-op threads (default: all cores).")
@click.option("--polygraphy/--no-polygraphy", default=True, show_default=True,
              help="Also compare a few of the feeds with Polygraphy's Comparator (rung 4; skipped if not installed).")
@click.option("--prompt", "prompts", multiple=True,
              help="Text-to-image bundles: a prompt (repeatable; cycled over the samples; default "
                   "'the digit 0' .. 'the digit 9').")
@click.option("--json-only", is_flag=True, help="Print the JSON report instead of the table; draw no plot.")
def parity(bundle, precision, backend, component, sampler, steps, guidance, seed, num, threads, polygraphy, prompts,
           json_only):
    """Per-forward and per-step drift of a precision/backend against the bundle's FP32 ONNX.

    The same x_T, labels, conditions and noise go through both; every reference forward is
    also fed to the candidate (per-forward drift, gated: rel-L2 ≤ 5e-3 for fp16, 5e-2 for
    int8, 1e-3 for an fp32 engine), and the candidate also samples on its own (accumulated
    drift of x_t and x0). Writes BUNDLE/parity/PRECISION-BACKEND-COMPONENT.json and .png."""
    bundle_obj, report = run_parity(bundle, precision, backend, component, sampler, steps, seed, num, guidance,
                                    threads, polygraphy, prompts)
    written = _write(bundle_obj, report, f"{precision}-{backend}-{component}", plot=not json_only)
    if json_only:
        click.echo(json.dumps(_json_safe(report.to_dict()), indent=2))
    else:
        s = report.settings
        what = (f"{s['sampler']}, {s['steps']} steps, w = {s['guidance']:g}, n = {s['n']}, seed {s['seed']}"
                if report.kind == "denoiser" else f"{s['cases']} draws of batch {s['batch']}, seed {s['seed']}")
        click.echo(f"{component}: {report.candidate} vs {report.reference} ({what})")
        for line in [*table(report), *_final_lines(report)]:
            click.echo(line)
        click.echo(f"wrote {', '.join(written)}")
    if not report.passed:
        raise ParityGateError(f"parity FAIL ({precision} on {backend}, {component}): {'; '.join(report.failures)}; "
                              f"report in {written[0]}")
    if not json_only:
        click.echo(f"PASS: worst per-forward rel-L2 {report.worst_rel_l2:.2e} ≤ gate {report.gate_rel_l2:g}")


COMMANDS = (parity,)
