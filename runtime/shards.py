"""Sharded, resumable generation: the samples of a run are split into shards of consecutive
sample indices, and each finished shard is written whole (an .npz, and a PNG grid where there
are images) into an output directory whose manifest, ``run.json``, records the run and every
shard done, with its files' sha256. A resumed run redoes only the shards the manifest does not
vouch for. Shards are drawn with :class:`~edgediff.runtime.pipeline.Pipeline` itself and
``first`` set to the shard's first sample, and noise is per sample (:mod:`.noise`), so the
shards together equal one single-process ``edgediff generate`` with the same options,
whatever the shard size, the number of workers or the order in which shards finish.

Ray-free: the in-process runner is :func:`local_runner`; :mod:`.distributed` runs the same
:class:`ShardWorker` in Ray actors. One writer, the driver, writes every file.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .bundle import MANIFEST, manifest_digest
from .errors import InvalidInput, OutputExists
from .files import read_json, sha256_file, write_json_atomic

RUN_FILE = "run.json"
SHARD_DIR = "shards"
FORMAT = "edgediff-shards/1"


@dataclass(frozen=True)
class RunSpec:
    """What decides a run's samples: a resumed run must match it field for field. Batch
    sizes, threads and worker counts are left out: they never change a sample."""

    bundle: str                     # absolute path (every worker opens it there)
    bundle_digest: str              # sha256 of its manifest: a changed bundle is another run
    count: int                      # samples in the run (n per prompt × prompts)
    shard_size: int
    seed: int = 0
    first: int = 0
    n: int = 1                      # per prompt (text-to-image), else = count
    classes: list | None = None
    prompts: list | None = None
    sampler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    classifier_scale: float = 0.0
    backend: str = "ort"
    precision: str = "fp32"
    device: str = "cpu"
    allow_nonfinite: bool = False

    def shards(self) -> list["Shard"]:
        return [Shard(k, a, min(a + self.shard_size, self.count))
                for k, a in enumerate(range(0, self.count, self.shard_size))]


@dataclass(frozen=True)
class Shard:
    index: int
    start: int                      # run-relative: samples first+start .. first+stop-1
    stop: int

    @property
    def stem(self) -> str:
        return f"{SHARD_DIR}/shard-{self.index:06d}"


@dataclass
class WorkerOptions:
    """How a worker runs (never what it draws)."""

    batch: int = 16
    decode_batch: int = 16
    threads: int | None = None
    public_key: str | None = None


def make_spec(bundle, count: int, shard_size: int, **choices) -> RunSpec:
    """A :class:`RunSpec` for the bundle at ``bundle`` (its manifest read here, hashes
    checked by the workers that open it)."""
    path = Path(bundle).resolve()
    for name, value in (("count", count), ("shard size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInput(f"{name} must be a positive integer, got {value!r}")
    digest = manifest_digest(read_json(path / MANIFEST))
    return RunSpec(str(path), digest, count, shard_size, **choices)


class ShardWorker:
    """One open pipeline drawing shards of a run; the same code in-process and in a Ray actor."""

    def __init__(self, spec: RunSpec, options: WorkerOptions):
        from .pipeline import Pipeline

        self.spec, self.options = spec, options
        self.pipe = Pipeline.from_bundle(spec.bundle, spec.backend, spec.precision, device=spec.device,
                                         threads=options.threads, max_batch=options.batch,
                                         decode_batch=options.decode_batch, public_key=options.public_key)
        self._text = None
        self.current: tuple[int | None, int] = (None, 0)     # (shard index, samples drawn so far)

    def _contexts(self, shard: Shard):
        """The shard's rows of the run's prompt contexts. Every worker encodes the run's whole
        prompt list as a single process would (same texts, same batches), so a context row,
        and thus a sample, is bit for bit the one of a single run."""
        from .pipeline import resolve_settings
        from .prompts import TextContexts

        s = self.spec
        if self._text is None:
            guided = resolve_settings(self.pipe.manifest, s.sampler, s.steps, s.guidance).guidance != 1.0
            self._text = self.pipe.prompt_contexts(s.prompts, self.options.batch, guided)
        text, order = self._text
        rows = order[np.arange(shard.start, shard.stop) // s.n]       # each sample's prompt row
        return TextContexts(text.context[rows], text.null, [text.prompts[i] for i in rows]), rows

    def _ticker(self, shard: Shard, report):
        """The pipeline's progress callback (model calls) -> ``current``: (shard, samples drawn)."""
        from .pipeline import total_model_calls

        s, size = self.spec, shard.stop - shard.start
        total = total_model_calls(self.pipe.manifest, size, min(self.options.batch, size),
                                  sampler=s.sampler, steps=s.steps, guidance=s.guidance)
        calls = [0]
        self.current = (shard.index, 0)

        def tick(k: int) -> None:
            calls[0] += k
            self.current = (shard.index, min(size, calls[0] * size // total))
            if report is not None:
                report(*self.current)
        return tick

    def run(self, shard: Shard, report=None):
        """Draw ``shard``: a :class:`~edgediff.runtime.pipeline.Generation` of its samples.
        ``report(shard index, samples drawn)`` is told as the sampling goes (also kept in ``current``)."""
        s, o = self.spec, self.options
        choice = dict(sampler=s.sampler, steps=s.steps, guidance=s.guidance, progress=self._ticker(shard, report))
        if s.prompts:
            context, rows = self._contexts(shard)
            out = self.pipe(1, seed=s.seed, first=s.first + shard.start, batch=o.batch, decode_batch=o.decode_batch,
                            context=context, classifier_scale=s.classifier_scale,
                            allow_nonfinite=s.allow_nonfinite, **choice)
            out.prompts = np.array(self._text[0].prompts, dtype=str)   # the run's distinct prompts, as one run saves
            out.prompt_index = rows
            return out
        return self.pipe(shard.stop - shard.start, classes=s.classes, seed=s.seed, first=s.first + shard.start,
                         batch=o.batch, decode_batch=o.decode_batch, classifier_scale=s.classifier_scale,
                         allow_nonfinite=s.allow_nonfinite, **choice)

    def close(self) -> None:
        self.pipe.close()


class LocalRunner:
    """Run shards one after another in this process: ``runner(shards)`` yields (shard,
    generation); ``on_progress(shard index, samples drawn)``, when set, hears of every model call."""

    def __init__(self, spec: RunSpec, options: WorkerOptions):
        self.spec, self.options, self.on_progress = spec, options, None

    def __call__(self, shards):
        worker = ShardWorker(self.spec, self.options)
        try:
            for shard in shards:
                yield shard, worker.run(shard, self.on_progress)
        finally:
            worker.close()


def local_runner(spec: RunSpec, options: WorkerOptions) -> LocalRunner:
    return LocalRunner(spec, options)


@dataclass
class RunState:
    """``run.json``: the spec and the shards done (``{index: {"start", "stop", "files": {name: sha256}}}``)."""

    spec: RunSpec
    done: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"format": FORMAT, "spec": asdict(self.spec),
                "done": {str(k): v for k, v in sorted(self.done.items())}}


def open_run(out_dir, spec: RunSpec, resume: bool) -> RunState:
    """The state to continue in ``out_dir``: a fresh one, or (``resume``) the manifest's, if it
    is this run's. Refuses, in one line, a directory that is not a run's (or not this run's),
    one inside the bundle, and a run there without ``resume``. Nothing is written."""
    out = Path(os.path.abspath(out_dir))
    if Path(spec.bundle) in (out.resolve(), *out.resolve().parents):
        raise InvalidInput(f"{out} is inside the bundle; write the shards elsewhere")
    manifest = out / RUN_FILE
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputExists(f"{out} exists and is not a directory; choose another --out-dir")
    if not manifest.is_file():
        if out.is_dir() and any(out.iterdir()):
            raise OutputExists(f"{out} is not empty and holds no {RUN_FILE}; choose another --out-dir")
        return RunState(spec)
    if not resume:
        raise OutputExists(f"{out} holds a run already: add --resume to finish it, or choose another --out-dir")
    raw = read_json(manifest)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise InvalidInput(f"{manifest} is not an edgediff shard manifest ({FORMAT})")
    old = raw.get("spec", {})
    changed = [k for k, v in asdict(spec).items() if _jsonish(old.get(k)) != _jsonish(v)]
    if changed:
        raise InvalidInput(f"--resume: {out} was started with other options ({', '.join(changed)} differ); "
                           "give the same ones, or choose another --out-dir")
    return RunState(spec, {int(k): v for k, v in raw.get("done", {}).items() if _intact(out, v)})


def _jsonish(value):
    """JSON's view of a value (tuples are lists), to compare a spec with a stored one."""
    return [_jsonish(v) for v in value] if isinstance(value, (list, tuple)) else value


def _intact(out: Path, record) -> bool:
    """A shard counts as done only while all its files are there with the recorded sha256."""
    try:
        return all((out / name).is_file() and sha256_file(out / name) == digest
                   for name, digest in record["files"].items())
    except (OSError, TypeError, KeyError, AttributeError):
        return False


def _write_shard(out: Path, manifest, shard: Shard, generation) -> dict:
    """The shard's npz (+ PNG where there are images), written together; returns their sha256."""
    from .images import save_outputs

    png = out / f"{shard.stem}.png" if generation.images is not None else None
    npz = out / f"{shard.stem}.npz"
    save_outputs(manifest, generation, png=png, npz=npz)
    return {str(p.relative_to(out)): sha256_file(p) for p in (npz, png) if p is not None}


def run_shards(spec: RunSpec, out_dir, runner, resume: bool = False, progress=None,
               state: RunState | None = None) -> dict:
    """Draw every shard of ``spec`` not yet done in ``out_dir`` with ``runner`` (see
    :func:`local_runner`, :func:`edgediff.runtime.distributed.ray_runner`), writing each as it
    arrives and then the manifest. ``progress(k)``: k more samples are drawn (skipped ones
    at the start; while a shard is drawn, as its batches go, where the runner tells; k < 0
    when a dead worker's shard starts over). ``state``: what :func:`open_run` returned for this
    run, if the caller opened it already (a resume then hashes the shard files once); it is
    updated as shards are written. Returns ``{"done": shards drawn now, "skipped": shards kept}``."""
    from .bundle import read_bundle

    out = Path(os.path.abspath(out_dir))
    state = open_run(out, spec, resume) if state is None else state
    manifest = read_bundle(spec.bundle, verify=False).manifest
    todo = [s for s in spec.shards() if s.index not in state.done]
    skipped = len(spec.shards()) - len(todo)
    if progress is not None and skipped:
        progress(sum(s.stop - s.start for s in spec.shards() if s.index in state.done))
    drawn: dict[int, int] = {}

    def seen(index: int, samples: int) -> None:      # a shard's samples so far; a retried one restarts at 0
        if progress is not None and samples != drawn.get(index, 0):
            progress(samples - drawn.get(index, 0))
        drawn[index] = samples

    if hasattr(runner, "on_progress"):
        runner.on_progress = seen
    for shard, generation in runner(todo):      # the directory appears with the first shard drawn
        if not (out / RUN_FILE).is_file():
            (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
            write_json_atomic(out / RUN_FILE, state.to_json())      # before any shard: the dir is a run's
        files = _write_shard(out, manifest, shard, generation)
        state.done[shard.index] = {"start": shard.start, "stop": shard.stop, "files": files}
        write_json_atomic(out / RUN_FILE, state.to_json())
        seen(shard.index, shard.stop - shard.start)
    return {"done": len(todo), "skipped": skipped}


def read_shards(out_dir, state: RunState | None = None) -> dict[str, np.ndarray]:
    """The finished run in ``out_dir`` as one archive: every shard's arrays concatenated in
    sample order (``prompts`` taken once); refuses a run with shards missing. ``state``: the
    run as :func:`run_shards` just left it (its shards checked or written by this process, so
    not hashed again); else ``run.json``, every shard's files checked against their sha256."""
    out = Path(out_dir)
    if state is None:
        raw = read_json(out / RUN_FILE)
        spec = RunSpec(**raw["spec"])
        done = {int(k): v for k, v in raw["done"].items() if _intact(out, v)}
    else:
        spec, done = state.spec, state.done
    missing = [s.index for s in spec.shards() if s.index not in done]
    if missing:
        raise InvalidInput(f"{out}: {len(missing)} shard(s) not done (first: {missing[0]}); finish with --resume")
    parts: dict[str, list] = {}
    for s in spec.shards():
        with np.load(out / f"{s.stem}.npz") as z:
            for name in z.files:
                parts.setdefault(name, []).append(z[name])
    return {k: v[0] if k == "prompts" else np.concatenate(v) for k, v in parts.items()}
