"""Where a deployed model drifts from the FP32 reference: per forward, per sampler step, and
in the final samples (``edgediff parity``; docs/architecture.md §6). Torch-free.

Two backends of one bundle run the same sampling (same x_T, labels, conditions and per-step
noise, through :func:`~.pipeline.generate`) twice:

- *in lockstep*: the reference drives the trajectory and :class:`Tee` feeds every one of its
  model calls, unchanged (guidance halves, self-conditioning, condition features included),
  to the candidate too; the difference is the candidate's own error at that forward (the
  ladder's per-forward gate applies to it);
- *free-running*: the candidate drives its own trajectory, so the difference of x_t and of
  the sampler's x0 estimate per step is the *accumulated* drift a user sees.

Companion components (decoder, encoder, ...) have no trajectory: they are compared per
forward on a few seeded inputs of their declared shapes (:func:`component_drift`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .conditions import COND_COMPONENT, COND_INPUT, ConditionFeatures, encode_conditions
from .errors import InvalidInput
from .manifest import TEXT_CONTEXT
from .parity import OutputCheck, ParityCase, ParityResult
from .pipeline import decode, generate, resolve_labels, resolve_settings
from .samplers import model_calls
from .solvers import predict

# The ladder's per-forward gate of each candidate precision (docs/architecture.md §6): rung 2
# (FP16), rung 3 (INT8); an FP32 candidate is another backend of the FP32 model (rung 4's
# FP32 engine check).
GATES = {"fp32": 1e-3, "fp16": 5e-3, "int8": 5e-2}


TRACE_BYTES = 2 << 30   # the reference trajectory's x_t and x0 per step are kept until the candidate's run


def gate_for(precision: str) -> float:
    if precision not in GATES:
        raise InvalidInput(f"no parity gate for precision {precision!r}; choose from {', '.join(GATES)}")
    return GATES[precision]


# --- the x0 prediction of one forward ----------------------------------------------------------
def model_time_marginal(schedule, t_model: float) -> tuple[float, float]:
    """(signal, noise) of the marginal at a model-time input: the model is always called with
    the VP marginal x = alpha·x0 + sigma·eps (euler/heun divide their VE x by sqrt(sigma²+1)
    before calling), or DDM's x = (1 - t)·x0 + sqrt(t)·eps."""
    if schedule.kind == "discrete":
        step = t_model - schedule.model_time_offset
        t = np.clip((step + 1.0) / schedule.num_train_timesteps, schedule.t_min, schedule.t_max)
    elif schedule.kind == "vp_continuous":
        t = t_model / schedule.model_time_scale
    else:
        t = t_model
    a, s = schedule.marginal(t)
    return float(a), float(s)


def x0_of(out: dict, feed: dict, schedule) -> np.ndarray | None:
    """The x0 one forward predicts, in float64, whatever the model's prediction type: its ``x0``
    output, from ``v`` or ``eps`` at the call's (alpha, sigma), or DDM's x − t·c − sqrt(t)·eps."""
    x, t = np.asarray(feed["x"], np.float64), float(np.asarray(feed["t"]).reshape(-1)[0])
    if "x0" in out:
        return np.asarray(out["x0"], np.float64)
    if schedule.kind == "ddm_constant":
        if "c" not in out or "eps" not in out:
            return None
        return x - t * np.asarray(out["c"], np.float64) - np.sqrt(t) * np.asarray(out["eps"], np.float64)
    alpha, sigma = model_time_marginal(schedule, t)
    if "eps" not in out and "v" not in out:
        return None
    eps, x0 = predict({k: np.asarray(v, np.float64) for k, v in out.items()}, x, alpha, sigma)
    return x0 if x0 is not None else (x - sigma * eps) / alpha


# --- lockstep --------------------------------------------------------------------------------
def _check(name: str, ref, got) -> dict:
    c = OutputCheck.compare(name, ref, got)
    record = {"rel_l2": c.rel_l2, "max_abs": c.max_abs, "finite": c.finite}
    return {**record, "mismatch": c.mismatch} if c.mismatch else record


def _compare_outputs(ref: dict, got: dict) -> dict:
    missing = sorted(set(ref) - set(got))
    if missing:
        raise InvalidInput(f"candidate lacks output(s): {', '.join(missing)}")
    return {name: _check(name, ref[name], got[name]) for name in ref}


class Tee:
    """A backend that answers with the reference's outputs and, on the same feed, runs the
    candidate and records how far its outputs (and the x0 they imply) are from the reference's.
    ``feeds`` keeps the feeds of the calls numbered in ``keep`` (all when None) for a later
    cross-check (Polygraphy); a long run of a large model would not fit in memory otherwise."""

    def __init__(self, reference, candidate, schedule, keep: set[int] | None = None):
        self.reference, self.candidate, self.schedule = reference, candidate, schedule
        self.inputs, self.outputs = reference.inputs, reference.outputs
        self.check_finite = False
        self.keep = keep
        self.calls: list[dict] = []
        self.feeds: list[dict] = []

    def infer(self, feed: dict) -> dict:
        ref, got = self.reference.infer(feed), self.candidate.infer(feed)
        record = {"t": float(np.asarray(feed["t"]).reshape(-1)[0]) if "t" in feed else None,
                  "outputs": _compare_outputs(ref, got)}
        if "x" in feed and "t" in feed:
            x0_ref, x0_got = x0_of(ref, feed, self.schedule), x0_of(got, feed, self.schedule)
            if x0_ref is not None:
                record["x0"] = _check("x0", x0_ref, x0_got)
        if self.keep is None or len(self.calls) in self.keep:
            self.feeds.append({k: np.array(v) for k, v in feed.items()})
        self.calls.append(record)
        return ref

    def close(self) -> None:
        pass


class _Trace:
    """The sampler's per-step callback: x_t and the x0 estimate after every step, with the
    forwards (of a :class:`Tee`) made during the step."""

    def __init__(self, tee: Tee | None = None):
        self.tee, self.steps, self._seen = tee, [], 0

    def __call__(self, info: dict) -> None:
        denoised = info.get("denoised")
        step = {"i": int(info["i"]), "t": float(info["t"]), "x": np.array(info["x"]),
                "denoised": None if denoised is None else np.array(denoised)}
        if self.tee is not None:
            step["forwards"] = self.tee.calls[self._seen:]
            self._seen = len(self.tee.calls)
        self.steps.append(step)


@dataclass
class DriftReport:
    """The result of one comparison; ``to_dict()`` is the JSON written into ``parity/``."""

    kind: str                                   # "denoiser" (a sampling run) or "forward" (cases)
    reference: str
    candidate: str
    gate_rel_l2: float
    settings: dict
    steps: list[dict]                           # per step (denoiser) or per case (component)
    final: dict = field(default_factory=dict)
    checks: dict = field(default_factory=dict)  # extra checks by name: {"passed": bool, ...}
    images: tuple | None = None                 # (reference, candidate) final images, not in the JSON
    labels: np.ndarray | None = None
    feeds: list = field(default_factory=list, repr=False)      # the compared feeds (Polygraphy), not in the JSON

    def forwards(self):
        for step in self.steps:
            yield from step.get("forwards", [])

    @property
    def output_names(self) -> list[str]:
        names = []
        for fw in self.forwards():
            names += [n for n in (*fw["outputs"], *(["x0"] if "x0" in fw else [])) if n not in names]
        return names

    def worst(self, name: str) -> float:
        vals = [(fw["x0"] if name == "x0" else fw["outputs"][name])["rel_l2"] for fw in self.forwards()
                if (name == "x0" and "x0" in fw) or name in fw["outputs"]]
        return max(vals, default=0.0)

    @property
    def worst_rel_l2(self) -> float:
        """The gated figure: the largest per-forward rel-L2 over the model's outputs."""
        return max((c["rel_l2"] for fw in self.forwards() for c in fw["outputs"].values()), default=0.0)

    @property
    def finite(self) -> bool:
        return all(c["finite"] for fw in self.forwards() for c in fw["outputs"].values())

    @property
    def failures(self) -> list[str]:
        why = []
        if not any(True for _ in self.forwards()):
            why.append("no forward was compared")
        if not self.finite:
            bad = next(fw for fw in self.forwards() if not all(c["finite"] for c in fw["outputs"].values()))
            why.append(f"the candidate's outputs are not finite (first at t = {bad['t']})")
        worst = self.worst_rel_l2
        if not worst <= self.gate_rel_l2:          # NaN fails too
            fw = max(self.forwards(), key=lambda f: max(c["rel_l2"] for c in f["outputs"].values()))
            name = max(fw["outputs"], key=lambda n: fw["outputs"][n]["rel_l2"])
            where = f" ({name} at t = {fw['t']:g})" if fw["t"] is not None else f" ({name})"
            why.append(f"per-forward rel-L2 {worst:.2e}{where} exceeds the gate {self.gate_rel_l2:g}")
        why += [f"{name}: {c['summary']}" for name, c in self.checks.items() if not c["passed"]]
        return why

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_parity(self) -> ParityResult:
        """The same comparison as a :class:`~.parity.ParityResult` (one case per forward), the
        type the FP16 conversion's gate and ``parity.json`` use."""
        result = ParityResult(self.reference, self.candidate, self.gate_rel_l2, None)
        for step in self.steps:
            for fw in step.get("forwards", []):
                checks = [OutputCheck(n, c["rel_l2"], c["max_abs"], c["finite"], c.get("mismatch"))
                          for n, c in fw["outputs"].items()]
                result.cases.append(ParityCase(step.get("label") or f"step {step['i'] + 1}", checks))
        return result

    def to_dict(self) -> dict:
        steps = [{k: v for k, v in s.items() if k not in ("x", "denoised")} for s in self.steps]
        failures = self.failures
        return {"passed": not failures, "failures": failures, "kind": self.kind,
                "reference": self.reference, "candidate": self.candidate,
                "gate": {"per_forward_rel_l2": self.gate_rel_l2},
                "worst": {n: self.worst(n) for n in self.output_names}, "settings": self.settings,
                "steps": steps, "final": self.final, "checks": self.checks}


def _psnr(ref: np.ndarray, got: np.ndarray, peak_to_peak: float = 2.0) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2); inf when identical."""
    mse = float(np.mean((np.asarray(got, np.float64) - np.asarray(ref, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10.0 * np.log10(peak_to_peak ** 2 / mse))


def _conditions(manifest, n: int, seed: int, cond_encoder) -> ConditionFeatures | None:
    """Image-conditioned bundles: ``n`` conditions ~ U(-1, 1) (seeded), encoded once by the
    FP32 condition encoder, so both sides get the very same features."""
    if TEXT_CONTEXT in manifest.inputs:
        raise InvalidInput("a text-to-image bundle's denoiser is compared on encoded prompts: pass conditions "
                           "(edgediff parity encodes --prompt with the bundle's FP32 text encoder)")
    if COND_COMPONENT not in manifest.components:
        return None
    if cond_encoder is None:
        raise InvalidInput("this image-conditioned bundle needs its condition encoder to compare the denoiser")
    shape = manifest.component(COND_COMPONENT).inputs[COND_INPUT]["shape"][1:]
    conds = np.random.default_rng(seed).uniform(-1.0, 1.0, (n, *shape)).astype(np.float32)
    return ConditionFeatures(encode_conditions(cond_encoder, conds), np.arange(n, dtype=np.int64))


def denoiser_drift(manifest, reference, candidate, *, n: int = 4, sampler: str | None = None,
                   steps: int | None = None, guidance: float | None = None, seed: int = 0,
                   decoder=None, cond_encoder=None, conditions: ConditionFeatures | None = None,
                   gate: float = GATES["fp16"],
                   names: tuple[str, str] = ("reference", "candidate")) -> DriftReport:
    """Sample ``n`` images with ``reference`` and ``candidate`` (denoiser backends of the bundle
    of ``manifest``) from the same x_T, labels (every class in turn), conditions and noise;
    compare per forward in lockstep and per step free-running (module docstring). ``decoder``
    (FP32, latent bundles) decodes both final samples, so the image figures isolate the denoiser.
    ``conditions``: the encoded conditions of the ``n`` samples (text contexts); by default
    seeded condition images through ``cond_encoder`` for image-conditioned bundles."""
    s = resolve_settings(manifest, sampler, steps, guidance)
    labels = resolve_labels(manifest, n, None)
    conditions = conditions if conditions is not None else _conditions(manifest, n, seed, cond_encoder)
    common = dict(sampler=s.sampler, steps=s.steps, batch=n, labels=labels, guidance=s.guidance, seed=seed,
                  conditions=conditions, allow_nonfinite=True)
    calls = model_calls(s.sampler, manifest.noise_schedule, s.steps, **s.options)
    need = 2 * s.steps * n * int(np.prod(manifest.sample_shape)) * 4
    if need > TRACE_BYTES:
        raise InvalidInput(f"comparing {n} samples over {s.steps} steps keeps {need / 2**30:.1f} GiB of trajectory "
                           f"(limit {TRACE_BYTES / 2**30:.0f} GiB): lower -n or --steps")
    tee = Tee(reference, candidate, manifest.noise_schedule, keep={0, calls // 2, calls - 1})
    ref_trace, cand_trace = _Trace(tee), _Trace()
    ref = generate(tee, manifest, n, callback=ref_trace, **common).samples
    got = generate(candidate, manifest, n, callback=cand_trace, **common).samples
    for r, c in zip(ref_trace.steps, cand_trace.steps):
        r["x_t"] = _check("x_t", r["x"], c["x"])
        if r["denoised"] is not None and c["denoised"] is not None:
            r["x0_estimate"] = _check("x0", r["denoised"], c["denoised"])
    ref_img, got_img = (decode(decoder, ref, n, True), decode(decoder, got, n, True)) \
        if manifest.space == "latent" and decoder is not None else (ref, got)
    # the images a user sees: clipped to [-1, 1] as to_uint8 does
    ref_img, got_img = (np.clip(np.nan_to_num(a, nan=0.0), -1.0, 1.0) for a in (ref_img, got_img))
    final = {"samples": _check("samples", ref, got),
             "images": {"max_abs": float(np.max(np.abs(got_img.astype(np.float64) - ref_img))),
                        "psnr_db": _psnr(ref_img, got_img),
                        "decoded": manifest.space == "latent" and decoder is not None}}
    settings = {"sampler": s.sampler, "steps": s.steps, "guidance": s.guidance, "n": n, "seed": seed,
                "labels": None if labels is None else labels.tolist(), "forwards": len(tee.calls)}
    return DriftReport("denoiser", names[0], names[1], gate, settings, ref_trace.steps, final,
                       images=(ref_img, got_img), labels=labels, feeds=tee.feeds)


# --- components: per forward on seeded inputs -------------------------------------------------
def component_feed(component, batch: int, rng: np.random.Generator) -> dict:
    """Inputs of a component's declared shapes drawn as the runtime feeds them: latents ~ N(0, 1),
    images and conditions ~ U(-1, 1), CLIP-shaped token ids (start, random words, end padding),
    labels over the classes, t over the training steps; any other float input ~ N(0, 1)."""
    extra = component.extra.get("config", {})
    feed = {}
    for name, decl in component.inputs.items():
        shape = (batch, *decl["shape"][1:])
        if name in ("image", COND_INPUT):
            feed[name] = rng.uniform(-1.0, 1.0, shape).astype(np.float32)
        elif name == "input_ids":
            vocab = extra.get("vocab_size", 49408)
            ids = np.full(shape, vocab - 1, np.int64)                        # end-of-text padding
            for row in ids:
                k = int(rng.integers(0, shape[1] - 1))
                row[0], row[1:1 + k] = vocab - 2, rng.integers(0, vocab - 2, k)
            feed[name] = ids
        elif decl["dtype"].startswith("int"):
            high = component.extra.get("num_classes", 10) if name == "y" else 1000
            feed[name] = rng.integers(0, high, shape).astype(decl["dtype"])
        elif name == "t":
            feed[name] = rng.uniform(0, 999, shape).round().astype(np.float32)
        else:
            feed[name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def _infer(model, feed: dict) -> dict:
    """A backend's ``infer`` or a plain ``feed -> outputs`` callable (a PyTorch reference)."""
    return model.infer(feed) if hasattr(model, "infer") else model(feed)


def forward_cases(reference, candidate, cases, *, gate: float = GATES["fp16"],
                  names: tuple[str, str] = ("reference", "candidate"), settings: dict | None = None) -> DriftReport:
    """Per-forward drift on labelled feeds ``[(label, feed), ...]``: a companion's seeded draws
    (`edgediff parity --component`) and the FP16 conversion's gate cases (export/fp16.py), so
    both gates are measured by this one function."""
    steps, feeds = [], []
    for i, (label, feed) in enumerate(cases):
        ref, got = _infer(reference, feed), _infer(candidate, feed)
        t = float(np.asarray(feed["t"]).reshape(-1)[0]) if "t" in feed else None
        steps.append({"i": i, "label": label, "t": t, "forwards": [{"t": t, "outputs": _compare_outputs(ref, got)}]})
        feeds.append(feed)
    return DriftReport("forward", names[0], names[1], gate, settings or {"cases": len(steps)}, steps, feeds=feeds)


def component_drift(component, reference, candidate, *, cases: int = 4, batch: int = 2, seed: int = 0,
                    gate: float = GATES["fp16"], names: tuple[str, str] = ("reference", "candidate")) -> DriftReport:
    """Per-forward drift of a companion model on ``cases`` seeded input draws."""
    rng = np.random.default_rng(seed)
    draws = [(f"draw={i}", component_feed(component, batch, rng)) for i in range(cases)]
    return forward_cases(reference, candidate, draws, gate=gate, names=names,
                         settings={"cases": cases, "batch": batch, "seed": seed})


__all__ = ["GATES", "DriftReport", "Tee", "component_drift", "component_feed", "denoiser_drift", "forward_cases",
           "gate_for", "x0_of"]
