"""Beyond one process: ``generate --out-dir`` (sharded, resumable; on Ray with ``--ray``) and
``serve`` (a Ray Serve deployment). Ray is imported only when a command runs."""
from __future__ import annotations

import functools
import time

import click


def sharded_options(command):
    """The options of ``generate`` that draw the run in shards into a directory."""
    options = [
        click.option("--out-dir", type=click.Path(file_okay=False),
                     help="Write the samples in shards into this directory (shards/shard-NNNNNN.npz + .png, "
                          "run.json), each as it completes; resumable with --resume. With --npz, the whole run "
                          "is also written there at the end."),
        click.option("--shard-size", type=click.IntRange(1), help="Samples per shard (default 64; with --out-dir)."),
        click.option("--resume", is_flag=True, help="Finish the run in --out-dir: skip the shards already written."),
        click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
                     help="Draw the shards on Ray actors: a new local Ray instance, or the cluster at ADDRESS "
                          "(auto, ray://HOST:10001); needs --out-dir and the distributed extra."),
        click.option("--workers", type=click.IntRange(1),
                     help="Ray actors (default: the cluster's GPUs for GPU runs, else its CPUs / --threads)."),
    ]
    return functools.reduce(lambda cmd, opt: opt(cmd), reversed(options), command)


def sharded_generate(p: dict) -> None:
    """``generate`` with --out-dir: validate, then draw the shards in-process or on Ray."""
    from edgediff.runtime.images import save_npz
    from edgediff.runtime.shards import WorkerOptions, open_run, read_shards

    _refuse_combinations(p)
    spec = _spec(p)
    threads = p["threads"] or 1
    options = WorkerOptions(batch=p["batch"], decode_batch=p["decode_batch"], threads=p["threads"],
                            public_key=p["public_key"])
    start = time.perf_counter()
    state = open_run(p["out_dir"], spec, p["resume"])   # a refused --out-dir: one line, before Ray starts
    summary = _run(spec, options, p, threads, state)
    click.echo(f"{spec.count} samples in {len(spec.shards())} shards in {p['out_dir']} ({summary['done']} drawn now, "
               f"{summary['skipped']} kept) in {time.perf_counter() - start:.1f} s")
    if p["npz"]:                                        # the whole run as one archive, as `--npz` alone writes it
        save_npz(p["npz"], **read_shards(p["out_dir"], state))
        click.echo(f"wrote {p['npz']}")


def _refuse_combinations(p: dict) -> None:
    if not p["out_dir"]:
        raise click.UsageError("--ray, --resume, --shard-size and --workers go with --out-dir DIR")
    for name, flag in (("out", "--out"), ("cond_path", "--cond"), ("context_npz", "--context-npz")):
        if p[name]:
            raise click.UsageError(f"{flag} does not go with --out-dir (each shard is written there)")
    if p["workers"] and p["ray_address"] is None:
        raise click.UsageError("--workers counts Ray actors: add --ray")
    if p["one_class"] is not None and p["classes"] is not None:
        raise click.UsageError("give --class or --classes, not both")


def _spec(p: dict):
    """The run's spec, checked against the bundle before any worker starts."""
    from edgediff.cli import _parse_classes
    from edgediff.runtime.bundle import read_bundle
    from edgediff.runtime.images import check_outputs
    from edgediff.runtime.pipeline import resolve_labels, resolve_settings
    from edgediff.runtime.prompts import read_prompts_file
    from edgediff.runtime.shards import make_spec

    prompts = [*p["prompts"], *(read_prompts_file(p["prompts_file"]) if p["prompts_file"] else [])]
    wanted = [p["one_class"]] if p["one_class"] is not None else _parse_classes(p["classes"])
    manifest = read_bundle(p["bundle"], public_key=p["public_key"]).manifest
    check_outputs(p["bundle"], manifest, has_decoder=True, npz=p["npz"])      # the archive's place, up front
    resolve_settings(manifest, p["sampler"], p["steps"], p["guidance"])
    n = p["num"] or (4 if prompts else 64)
    count = n * (len(prompts) or 1)
    if not prompts:
        resolve_labels(manifest, 1, wanted)
    return make_spec(p["bundle"], count, p["shard_size"] or 64, seed=p["seed"], first=p["first"], n=n,
                     classes=wanted, prompts=prompts or None, sampler=p["sampler"], steps=p["steps"],
                     guidance=p["guidance"], classifier_scale=p["classifier_scale"], backend=p["backend"],
                     precision=p["precision"], device=p["device"], allow_nonfinite=p["allow_nonfinite"])


def _run(spec, options, p: dict, threads: int, state) -> dict:
    """Draw the run's missing shards (``state``: :func:`open_run`'s, shard files hashed once)."""
    from tqdm.auto import tqdm

    from edgediff.runtime.shards import local_runner, run_shards

    with tqdm(total=spec.count, desc="samples", unit="sample", disable=None) as bar:
        if p["ray_address"] is None:
            return run_shards(spec, p["out_dir"], local_runner(spec, options), p["resume"], bar.update, state)
        from edgediff.runtime.distributed import connect, import_ray, ray_runner

        owned = connect(p["ray_address"], num_cpus=p["workers"] and p["workers"] * threads)
        try:
            runner = ray_runner(spec, options, p["workers"], threads)
            return run_shards(spec, p["out_dir"], runner, p["resume"], bar.update, state)
        finally:
            if owned:
                import_ray().shutdown()


@click.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default="", metavar="[ADDRESS]",
              help="The Ray cluster to serve from (auto, ray://HOST:10001); default: a new local Ray instance.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the HTTP proxy listens on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="HTTP port.")
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(1), help="Replicas (fixed count).")
@click.option("--min-replicas", type=click.IntRange(1), help="Autoscale: fewest replicas (with --max-replicas).")
@click.option("--max-replicas", type=click.IntRange(1), help="Autoscale: most replicas.")
@click.option("--max-batch", default=16, show_default=True, type=click.IntRange(1, 1024),
              help="Requests merged into one batch at most.")
@click.option("--max-samples", default=64, show_default=True, type=click.IntRange(1, 4096),
              help="Samples per denoiser call at most (a larger merged batch runs in parts).")
@click.option("--batch-wait-ms", default=20.0, show_default=True, type=click.FloatRange(0, 10_000),
              help="How long the first request of a batch waits for others.")
@click.option("--max-n", default=16, show_default=True, type=click.IntRange(1, 1024),
              help="Samples one request may ask.")
@click.option("--backend", default="ort", show_default=True, type=click.Choice(["ort", "trt"]), help="Backend.")
@click.option("--precision", default="fp32", show_default=True, help="Which model of the bundle to run.")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda", "tensorrt"]),
              help="ONNX Runtime execution provider (cuda/tensorrt: one GPU per replica).")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1),
              help="CPUs (intra-op threads) per replica.")
def serve(bundle, ray_address, host, port, **options):
    """Serve a bundle over HTTP with Ray Serve (POST /generate, GET /health, GET /info) until ^C."""
    from edgediff.runtime.distributed import connect, import_ray
    from edgediff.runtime.serve_ray import ServeOptions, deployment_options, serving_bundle

    deployment_options(opts := ServeOptions(**options))
    _check_model(bundle, opts)                          # bad input: one line, before Ray starts
    owned = connect(ray_address)
    try:
        # ^C ends Serve in a Ray instance of our own; on a shared cluster, only our application
        with serving_bundle(str(bundle), opts, host, port, own_serve=owned and not ray_address):
            click.echo(f"serving {bundle} at http://{host}:{port}/generate (^C to stop)")
            while True:
                time.sleep(3600)
    finally:
        if owned:
            import_ray().shutdown()


def _check_model(bundle, opts) -> None:
    """The model each replica will open is in the bundle (and, for TensorRT, an engine of its
    precision): else every replica fails to start and ``serve.run`` raises a traceback."""
    from edgediff.runtime.bundle import read_bundle
    from edgediff.runtime.engines import ENGINE_DIR, EngineError, engine_candidates

    read_bundle(bundle).model_path(opts.precision)
    if opts.backend == "trt" and not engine_candidates(bundle, opts.precision):
        raise EngineError(f"--backend trt: no {opts.precision} TensorRT engine in {bundle}/{ENGINE_DIR}; "
                          f"build one with: edgediff build {bundle} --precision {opts.precision}")


COMMANDS: list = [serve]
