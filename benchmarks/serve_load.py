"""Load test of ``edgediff serve``: concurrent requests against a local Ray Serve deployment.

    .venv/bin/python benchmarks/serve_load.py --bundle build/digits-dit [--requests 64] [--steps 20]

Starts a local Ray (``--num-cpus``, default 2), deploys the bundle on 127.0.0.1 (a free port),
sends ``--requests`` requests at once (one thread each; class k % classes, seed k), and prints
p50/p99 latency, errors, requests per second and the denoiser batch sizes reached (the
``X-Edgediff-Batch`` header). ``--compare`` repeats the run with batching off (max batch 1).
Every request goes to the loopback address only, and the run is bounded by the request count.
"""
from __future__ import annotations

import argparse
import collections
import json
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> tuple[float, int, int | None]:
    """(seconds, HTTP status, batch samples) of one request."""
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            r.read()
            return time.perf_counter() - start, r.status, int(r.headers.get("X-Edgediff-Batch", 0))
    except urllib.error.HTTPError as exc:
        return time.perf_counter() - start, exc.code, None
    except OSError:
        return time.perf_counter() - start, 0, None


def load(url: str, requests: int, steps: int | None, classes: int | None) -> dict:
    bodies = [{"seed": k, **({"class": k % classes} if classes else {}), **({"steps": steps} if steps else {})}
              for k in range(requests)]
    start = time.perf_counter()
    with ThreadPoolExecutor(requests) as pool:
        results = list(pool.map(lambda b: _post(url, b), bodies))
    wall = time.perf_counter() - start
    ok = sorted(r[0] for r in results if r[1] == 200)
    pct = lambda q: ok[min(len(ok) - 1, int(q * len(ok)))] if ok else float("nan")  # noqa: E731
    batches = collections.Counter(r[2] for r in results if r[2])
    return {"requests": requests, "errors": requests - len(ok), "p50_s": round(pct(0.50), 3),
            "p99_s": round(pct(0.99), 3), "wall_s": round(wall, 3), "req_per_s": round(requests / wall, 2),
            "requests_by_batch_samples": dict(sorted(batches.items())), "max_batch_reached": max(batches, default=0)}


def run(bundle: str, args, max_batch: int) -> dict:
    from ray import serve

    from edgediff.runtime.client import Client
    from edgediff.runtime.serve_ray import ServeOptions, build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    options = ServeOptions(threads=args.threads, replicas=args.replicas, max_batch=max_batch,
                           max_samples=max_batch, batch_wait_ms=args.wait_ms)
    serve.run(build_app(bundle, options), name="edgediff", route_prefix="/")
    try:
        client = Client(f"http://127.0.0.1:{port}")
        info = client.info()
        client.generate(seed=0, steps=args.steps, label=0 if info["num_classes"] else None)    # warm-up
        result = load(f"http://127.0.0.1:{port}/generate", args.requests, args.steps, info["num_classes"])
        return {"max_batch": max_batch, "replicas": args.replicas, **result}
    finally:
        serve.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True, help="Bundle directory (e.g. build/digits-dit from `make demo`).")
    ap.add_argument("--requests", type=int, default=64, help="Concurrent requests.")
    ap.add_argument("--steps", type=int, help="Sampler steps per request (default: the bundle's).")
    ap.add_argument("--max-batch", type=int, default=64, help="Requests merged at most (@serve.batch).")
    ap.add_argument("--wait-ms", type=float, default=20.0, help="Batch wait timeout.")
    ap.add_argument("--replicas", type=int, default=1, help="Replicas.")
    ap.add_argument("--threads", type=int, default=1, help="CPUs per replica.")
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray.")
    ap.add_argument("--compare", action="store_true", help="Also run with batching off (max batch 1).")
    args = ap.parse_args()

    import ray

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        rows = [run(args.bundle, args, args.max_batch)]
        if args.compare:
            rows.append(run(args.bundle, args, 1))
    finally:
        ray.shutdown()
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
