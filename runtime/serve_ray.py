"""The bundle as a Ray Serve deployment (the ``distributed`` extra; Ray imported here only).

HTTP JSON API (see :mod:`.serving` for the fields):

    POST /generate  {"class": 3, "seed": 0, "n": 1, "steps": 20, "guidance": 2, "sampler": "ddim",
                     "format": "png"}   -> image/png (npz: application/x-npz)
    GET  /health    -> {"status": "ok"}
    GET  /info      -> the bundle's family, classes, samplers and defaults

Concurrent requests are collected by ``@serve.batch`` and drawn together, grouped by what a
batch must share (:func:`~edgediff.runtime.serving.group_key`); the header ``X-Edgediff-Batch``
tells how many samples the request's denoiser batch held. A bad request gets a 4xx with
``{"error": one line}``; the replica goes on serving.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass

from .errors import EdgediffError, InvalidInput
from .serving import failure

MAX_BODY = 64 * 1024
APP = "edgediff"                          # the Serve application's name (``serve.delete(APP)`` ends it)


@dataclass
class ServeOptions:
    """How the deployment runs: replicas (or autoscaling bounds), batching, resources."""

    backend: str = "ort"
    precision: str = "fp32"
    device: str = "cpu"
    threads: int = 1
    replicas: int = 1
    min_replicas: int | None = None      # with max_replicas: autoscale between them
    max_replicas: int | None = None
    max_batch: int = 16                   # requests per @serve.batch call
    max_samples: int = 64                 # samples per denoiser call
    batch_wait_ms: float = 20.0
    max_n: int = 16                       # samples one request may ask for

    @property
    def gpu(self) -> bool:
        """One GPU per replica (else ``threads`` CPUs)."""
        from .distributed import uses_gpu

        return uses_gpu(self.backend, self.device)

    @property
    def starting_replicas(self) -> tuple[int, str]:
        """The replicas ``serve.run`` waits for (the fixed count, or the autoscaling floor), and
        the option that set them."""
        if self.min_replicas is not None or self.max_replicas is not None:
            return self.min_replicas or 1, "--min-replicas"
        return self.replicas, "--replicas"


def deployment_options(o: ServeOptions) -> dict:
    options = {"ray_actor_options": {"num_gpus": 1} if o.gpu else {"num_cpus": o.threads},
               "max_ongoing_requests": max(2 * o.max_batch, 8), "health_check_period_s": 10}
    if o.min_replicas is not None or o.max_replicas is not None:
        low, high = o.min_replicas or 1, o.max_replicas or max(o.min_replicas or 1, o.replicas)
        if low > high:
            raise InvalidInput(f"--min-replicas {low} exceeds --max-replicas {high}")
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high,
                                         "target_ongoing_requests": max(o.max_batch // 2, 1)}
    else:
        options["num_replicas"] = o.replicas
    return options


def build_app(bundle: str, options: ServeOptions):
    """The Serve application of the bundle at ``bundle`` (give it to ``serve.run``)."""
    from ray import serve
    from starlette.responses import JSONResponse, Response

    def error(status: int, message: str):
        return JSONResponse({"error": " ".join(str(message).split())[:500]}, status_code=status)

    @serve.deployment(name=APP, **deployment_options(options))
    class EdgediffServer:
        def __init__(self):
            from .pipeline import Pipeline
            from .serving import Engine

            self.pipe = Pipeline.from_bundle(bundle, options.backend, options.precision, device=options.device,
                                             threads=options.threads, max_batch=options.max_samples)
            self.engine = Engine(self.pipe, options.max_samples)

        def check_health(self):
            if self.pipe.backend is None:
                raise RuntimeError("the backend is closed")

        @serve.batch(max_batch_size=options.max_batch, batch_wait_timeout_s=options.batch_wait_ms / 1000)
        async def _draw(self, requests: list) -> list:
            return await asyncio.get_running_loop().run_in_executor(None, self.engine.run, requests)

        async def __call__(self, http):
            path = http.url.path.rstrip("/") or "/"
            if path == "/health":
                return JSONResponse({"status": "ok"})
            if path == "/info":
                return JSONResponse(_info(self.pipe))
            if path != "/generate":
                return error(404, f"no such endpoint {path}: POST /generate, GET /health, GET /info")
            if http.method != "POST":
                return error(405, "POST a JSON object to /generate")
            body = await http.body()
            if len(body) > MAX_BODY:
                return error(413, f"the request body exceeds {MAX_BODY} bytes")
            try:
                request = self.engine.parse(json.loads(body or b"null"), options.max_n)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                return error(400, f"the request body is not JSON: {exc}")
            except EdgediffError as exc:
                return error(400, exc)
            answer = await self._draw(request)
            if (failed := failure(answer)) is not None:
                return error(*failed)
            data, content_type, batch = answer
            return Response(data, media_type=content_type, headers={"X-Edgediff-Batch": str(batch)})

    return EdgediffServer.bind()


def _info(pipe) -> dict:
    from .pipeline import resolve_settings
    from .samplers import SAMPLERS

    m = pipe.manifest
    s = resolve_settings(m)
    kind = m.noise_schedule.kind
    return {"family": m.family, "num_classes": m.num_classes, "text": pipe.context_shape is not None,
            "sample_shape": list(m.sample_shape), "space": m.space,
            "samplers": [name for name, rec in SAMPLERS.items() if kind in rec.schedules],
            "defaults": {"sampler": s.sampler, "steps": s.steps, "guidance": s.guidance}}


@contextlib.contextmanager
def serving_bundle(bundle: str, options: ServeOptions, host: str = "127.0.0.1", port: int = 8000,
                   own_serve: bool = False):
    """Start Serve's HTTP proxy on host:port and deploy the bundle there as the application
    :data:`APP`; the block runs once it is up. On leaving it (^C included), ends what this
    call started: all of Serve with ``own_serve`` (a Ray instance of this process's own), else
    only :data:`APP` (a shared cluster keeps its other applications)."""
    from ray import serve

    from .distributed import placeable

    placeable(options.gpu, options.threads, *options.starting_replicas)   # else serve.run waits for ever
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(build_app(bundle, options), name=APP, route_prefix="/")
        yield
    finally:
        if own_serve:
            serve.shutdown()
        else:
            serve.delete(APP)
