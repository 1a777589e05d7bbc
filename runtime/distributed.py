"""Sharded generation on Ray: a pool of actors, each holding one open pipeline
(:class:`~edgediff.runtime.shards.ShardWorker`), draws the shards of a run; the driver hands
out shards as actors free up and writes every result (:func:`~edgediff.runtime.shards.run_shards`).

A worker that dies (its process killed, its node lost) is restarted by Ray, and the shard it
was drawing goes back in the queue: shards are written only by the driver, only whole, and
named by their index, so a retried shard is neither lost nor written twice. Ray is imported
here, lazily (the ``distributed`` extra); only :mod:`.serve_ray` and the CLI's Ray commands
import this module.
"""
from __future__ import annotations

import collections
import logging
import signal
import threading

from .errors import EdgediffError, InvalidInput, missing_extra
from .shards import RunSpec, ShardWorker, WorkerOptions

# A shard whose worker died this many times is not tried again: the death is then its doing
# (memory, a crashing backend), and going on would loop.
MAX_ATTEMPTS = 3
POLL_S = 0.5            # how often the driver asks busy actors for their progress


def import_ray():
    try:
        import ray
    except ImportError as exc:
        if (missing := missing_extra(exc)) is None:
            raise
        raise missing from None
    return ray


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at ``address`` (``auto``, ``ray://host:10001``, ``host:6379``), or
    start a local one (``address`` None or ""; ``num_cpus`` caps it). Returns whether this call
    connected (so the caller disconnects); an already initialised Ray is used as it is."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        ray.init(address=address or None, num_cpus=None if address else num_cpus,
                 include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise InvalidInput(f"cannot reach a Ray cluster at {address or 'a new local instance'}: "
                           f"{' '.join(str(exc).split())[:300]}") from None
    finally:
        # Ray's core installs its own SIGTERM handler (a stack dump, then death): put ours
        # back, so ^C and SIGTERM still clean up and end in one line (runtime/interrupts.py).
        if threading.current_thread() is threading.main_thread():
            for signum, handler in handlers.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
    return True


def uses_gpu(backend: str, device: str) -> bool:
    """Whether a worker or replica of this backend/device holds one GPU (else CPUs)."""
    return backend == "trt" or device in ("cuda", "tensorrt")


def needs_gpu(spec: RunSpec) -> bool:
    return uses_gpu(spec.backend, spec.device)


def node_capacity(nodes: list, gpu: bool, threads: int) -> int:
    """How many workers of one GPU (``gpu``) or ``threads`` CPUs the alive ``nodes``
    (``ray.nodes()``) hold, each on one node; refuses, in one line, work that no single node
    could place (its actors would wait for ever, however many CPUs the cluster has in all)."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    if gpu:
        gpus = [int(r.get("GPU", 0)) for r in alive]
        if max(gpus, default=0) < 1:
            raise InvalidInput("this needs GPUs (--device cuda/tensorrt or --backend trt), "
                               "and the Ray cluster has none")
        return sum(gpus)
    cpus = [int(r.get("CPU", 0)) for r in alive]
    if threads > max(cpus, default=0):
        raise InvalidInput(f"--threads {threads}: no Ray node has that many CPUs "
                           f"(the largest has {max(cpus, default=0)})")
    return sum(c // threads for c in cpus)


def placeable(gpu: bool, threads: int, wanted: int | None = None, what: str = "--workers") -> int:
    """How many workers of one GPU or ``threads`` CPUs the cluster can place at once; with
    ``wanted``, refuses (one line) more than that: the ones left over would never start."""
    room = node_capacity(import_ray().nodes(), gpu, threads)
    if wanted is not None and wanted > room:
        each = "one GPU" if gpu else f"{threads} CPU{'s' if threads > 1 else ''}"
        raise InvalidInput(f"{what} {wanted}: the Ray cluster can place {room} of {each} each")
    return room


class _Actor:
    """The remote class around a :class:`ShardWorker`. A worker that cannot start (a bundle
    that fails its checks there, a missing backend) keeps the error and raises it at every
    shard, so the driver reports it in one line instead of restarting the actor in a loop."""

    def __init__(self, spec: RunSpec, options: WorkerOptions):
        self.worker, self.error = None, None
        try:
            self.worker = ShardWorker(spec, options)
        except Exception as exc:        # noqa: BLE001 -- handed to the driver, which reports it
            self.error = exc

    def run(self, shard):
        if self.error is not None:
            raise self.error
        return self.worker.run(shard)

    def progress(self) -> tuple[int | None, int]:
        """(shard index, samples drawn) of the shard being drawn: answered beside ``run``
        (the actor has a second thread for it), so the driver's bar moves within a shard."""
        return (None, 0) if self.worker is None else self.worker.current

    def pid(self) -> int:
        """The actor's process id (the tests kill it)."""
        import os

        return os.getpid()


class RayRunner:
    """``runner(shards)`` yields (shard, generation) as actors finish them, in any order.
    ``workers`` actors of ``threads`` CPUs each, or one GPU each for GPU runs."""

    def __init__(self, spec: RunSpec, options: WorkerOptions, workers: int | None = None, threads: int = 1):
        ray = import_ray()
        self.spec, self.options = spec, options
        gpu = needs_gpu(spec)
        # refuses more workers than the cluster places: the ones left over would hold shards for ever
        room = placeable(gpu, threads, workers)
        self.workers = workers or room
        resources = {"num_gpus": 1} if gpu else {"num_cpus": threads}
        remote = ray.remote(max_restarts=-1, max_task_retries=0, max_concurrency=2, **resources)(_Actor)
        opts = WorkerOptions(**{**vars(options), "threads": options.threads if gpu else threads})
        self.actors = [remote.remote(spec, opts) for _ in range(self.workers)]
        self.in_flight: dict = {}           # future -> (actor, shard)
        self.retries = 0
        self.on_progress = None             # (shard index, samples drawn), polled every POLL_S

    def __call__(self, shards):
        ray = import_ray()
        queue = collections.deque(shards)
        attempts: collections.Counter = collections.Counter()
        idle = list(self.actors)
        try:
            while queue or self.in_flight:
                while queue and idle:
                    actor, shard = idle.pop(), queue.popleft()
                    self.in_flight[actor.run.remote(shard)] = (actor, shard)
                done, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=POLL_S)
                if not done:
                    self._poll()
                    continue
                actor, shard = self.in_flight.pop(done[0])
                idle.append(actor)           # a dead actor is restarted by Ray: calls wait for it
                try:
                    result = ray.get(done[0])
                except ray.exceptions.RayActorError:
                    self._requeue(shard, attempts, queue)
                    continue
                except ray.exceptions.RayTaskError as exc:
                    raise _unwrap(exc) from None
                yield shard, result
        finally:
            self.close()

    def _requeue(self, shard, attempts, queue) -> None:
        """The worker of ``shard`` died: draw it again, first, unless that happened too often."""
        attempts[shard.index] += 1
        if attempts[shard.index] >= MAX_ATTEMPTS:
            raise EdgediffError(f"shard {shard.index} (samples {shard.start}..{shard.stop - 1}): "
                                f"its worker died {MAX_ATTEMPTS} times; giving up")
        self.retries += 1
        queue.appendleft(shard)
        if self.on_progress is not None:
            self.on_progress(shard.index, 0)          # it starts over

    def _poll(self) -> None:
        """Ask the busy actors how far their shards are; a restarting one is not waited for."""
        if self.on_progress is None:
            return
        ray = import_ray()
        asked = {actor.progress.remote(): shard for actor, shard in self.in_flight.values()}
        answered, _ = ray.wait(list(asked), num_returns=len(asked), timeout=POLL_S)
        for ref in answered:
            try:
                index, samples = ray.get(ref)
            except ray.exceptions.RayError:
                continue
            if index == asked[ref].index:
                self.on_progress(index, samples)

    def close(self) -> None:
        ray = import_ray()
        for future in self.in_flight:
            ray.cancel(future, force=False)
        self.in_flight.clear()
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


def _unwrap(exc) -> BaseException:
    """A worker's own error (one line, as in a single process) out of Ray's wrapper."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, EdgediffError):
        return cause
    if isinstance(cause, ImportError) and missing_extra(cause) is not None:
        return missing_extra(cause)
    return EdgediffError(f"a worker failed: {' '.join(str(cause or exc).split())[:500]}")


def ray_runner(spec: RunSpec, options: WorkerOptions, workers: int | None = None, threads: int = 1) -> RayRunner:
    return RayRunner(spec, options, workers, threads)
