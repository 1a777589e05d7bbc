"""Serving (runtime/serving.py, runtime/serve_ray.py, runtime/client.py): requests are checked
in one line, merged only with compatible ones, answered as one process would draw them; the
Ray Serve deployment batches concurrent requests and survives malformed ones."""
import io
import json
import socket
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from edgediff.runtime import Pipeline
from edgediff.runtime.errors import InvalidInput
from edgediff.runtime.serving import Engine, failure

# Ray Serve's config models use pydantic features deprecated in pydantic 2 (not ours to fix)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

BAD = [([], "JSON object"), ({"cls": 3}, "unknown field"), ({"class": 10}, "out of range"),
       ({"class": "3"}, "out of range"), ({"n": 0}, "'n'"), ({"seed": -1}, "'seed'"), ({"steps": 0}, "'steps'"),
       ({"guidance": float("nan")}, "'guidance'"), ({"sampler": "nope"}, "sampler"), ({"format": "jpg"}, "'format'"),
       ({"prompt": "a seven"}, "no prompt"), ({"seed": True}, "'seed'")]


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    with Pipeline.from_bundle(tiny_bundle, threads=1) as pipe:
        yield Engine(pipe, max_batch=64)


@pytest.mark.parametrize("body,words", BAD)
def test_malformed_requests_are_refused_in_one_line(engine, body, words):
    with pytest.raises(InvalidInput, match=words) as exc:
        engine.parse(body)
    assert "\n" not in str(exc.value)


def npz(answer):
    with np.load(io.BytesIO(answer[0])) as z:
        return {k: z[k] for k in z.files}


def test_merged_requests_equal_separate_runs_and_only_compatible_ones_merge(engine, tiny_bundle):
    bodies = [{"class": 3, "seed": 1, "steps": 3, "guidance": 2, "sampler": "ddpm", "format": "npz"},
              {"class": 5, "seed": 9, "n": 2, "first": 4, "steps": 3, "guidance": 2, "sampler": "ddpm",
               "format": "npz"},
              {"class": 5, "seed": 9, "steps": 4, "guidance": 2, "sampler": "ddpm", "format": "npz"},   # other steps
              {"seed": 2, "steps": 3, "guidance": 2, "sampler": "ddpm"}]                               # png, no class
    answers = engine.run([engine.parse(b) for b in bodies])
    assert [a[2] for a in answers] == [4, 4, 1, 4]      # samples in each request's denoiser batch
    assert answers[3][1] == "image/png" and answers[3][0][:4] == b"\x89PNG"
    for body, answer in zip(bodies[:3], answers):
        alone = engine.pipe(body.get("n", 1), classes=[body["class"]], seed=body["seed"], first=body.get("first", 0),
                            steps=body["steps"], guidance=2.0, sampler="ddpm")
        got = npz(answer)
        assert np.array_equal(got["images"], alone.images) and np.array_equal(got["labels"], alone.labels)


def test_a_failing_group_fails_alone(engine, monkeypatch):
    """Any fault of one group (a bug too) answers that group with one line; the groups merged
    beside it are still drawn."""
    draw = engine._draw

    def faulty(group):
        if group[0].settings.steps == 4:
            raise RuntimeError("backend fault\nsecond line")
        return draw(group)

    monkeypatch.setattr(engine, "_draw", faulty)
    answers = engine.run([engine.parse({"class": 1, "steps": 3, "format": "npz"}), engine.parse({"steps": 4}),
                          engine.parse({"class": 99 % 10, "steps": 4})])
    assert failure(answers[0]) is None and npz(answers[0])["images"].shape[0] == 1
    assert failure(answers[1]) == failure(answers[2]) == (500, "internal error (RuntimeError): backend fault second line")
    assert failure(InvalidInput("no\nway")) == (422, "no way")


def test_serve_refuses_a_bad_bundle_in_one_line(tmp_path, tiny_bundle, capsys):
    """Refused before Ray starts: what every replica would fail on at start."""
    from cli_helpers import run

    (tmp_path / "b").mkdir()
    for args, words in (([str(tmp_path / "b")], ""), ([str(tiny_bundle), "--precision", "fp16"], "no fp16 model"),
                        ([str(tiny_bundle), "--backend", "trt"], "no fp32 TensorRT engine")):
        code, _, err = run(["serve", *args], capsys)
        assert code == 1 and err.startswith("error: ") and words in err and len(err.strip().splitlines()) == 1, err


def test_replicas_the_cluster_cannot_place_are_refused(ray_local, tiny_bundle):
    """All replicas must fit (serve.run waits for them for ever): 2 CPUs hold 2 replicas of 1 thread."""
    from ray import serve

    from edgediff.runtime.serve_ray import ServeOptions, serving_bundle

    for options, words in ((ServeOptions(replicas=3), "--replicas 3: the Ray cluster can place 2 of 1 CPU each"),
                           (ServeOptions(replicas=2, threads=2), "--replicas 2: .* place 1 of 2 CPUs"),
                           (ServeOptions(min_replicas=3, max_replicas=4), "--min-replicas 3"),
                           (ServeOptions(device="cuda"), "has none")):
        with pytest.raises(InvalidInput, match=words):
            with serving_bundle(str(tiny_bundle), options):
                pass
    assert serve.context._get_global_client(raise_if_no_controller_running=False) is None     # nothing started


def test_replica_and_autoscaling_options_are_valid_serve_deployments():
    serve = pytest.importorskip("ray.serve")
    from edgediff.runtime.serve_ray import ServeOptions, deployment_options

    fixed = deployment_options(ServeOptions(replicas=3, threads=2))
    assert fixed["num_replicas"] == 3 and fixed["ray_actor_options"] == {"num_cpus": 2}
    scaled = deployment_options(ServeOptions(min_replicas=1, max_replicas=4, device="cuda"))
    assert scaled["autoscaling_config"]["max_replicas"] == 4 and scaled["ray_actor_options"] == {"num_gpus": 1}
    for options in (fixed, scaled):
        serve.deployment(**options)(type("Model", (), {"__call__": lambda self, request: None}))
    with pytest.raises(InvalidInput, match="exceeds"):
        deployment_options(ServeOptions(min_replicas=3, max_replicas=2))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, data: bytes):
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read(), r.headers.get("X-Edgediff-Batch")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), None


def test_ray_serve_batches_concurrent_requests_and_survives_bad_ones(ray_local, tiny_bundle):
    """Served through serving_bundle beside another app of the cluster, which outlives ours."""
    from ray import serve

    from edgediff.runtime.serve_ray import ServeOptions, serving_bundle

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    other = serve.deployment(ray_actor_options={"num_cpus": 0})(type("Other", (), {"__call__": lambda s, r: "hi"}))
    serve.run(other.bind(), name="other", route_prefix="/other")          # another user's app on the cluster
    try:
        with serving_bundle(str(tiny_bundle), ServeOptions(max_batch=8, batch_wait_ms=200), port=port):
            _exercise(tiny_bundle, f"http://127.0.0.1:{port}")
        assert set(serve.status().applications) == {"other"}      # on leaving, ours only is gone
    finally:
        serve.shutdown()


def _exercise(tiny_bundle, url):
    """The served app answers as one process draws, batches concurrent requests and survives bad ones."""
    from edgediff.runtime.client import Client, ServerError

    client = Client(url)
    assert client.health() and client.info()["num_classes"] == 10
    for data in (b"{not json", b'{"class": 99}', b'{"n": 1000}', b"[1, 2]"):
        status, body, _ = _post(url + "/generate", data)
        assert status == 400 and len(json.loads(body)["error"].splitlines()) == 1, (data, body)
    with pytest.raises(ServerError, match="out of range"):
        client.generate(label=12)
    bodies = [json.dumps({"class": k % 10, "seed": k, "steps": 3, "format": "npz"}).encode() for k in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda b: _post(url + "/generate", b), bodies))
    assert [r[0] for r in results] == [200] * 8
    assert max(int(r[2]) for r in results) > 1          # concurrent requests shared a batch
    with Pipeline.from_bundle(tiny_bundle, threads=1) as pipe:
        alone = pipe(1, classes=[3], seed=3, steps=3).images
    assert np.array_equal(np.load(io.BytesIO(results[3][1]))["images"], alone)
    assert client.generate(label=1, seed=0, steps=2)[:4] == b"\x89PNG"       # still serving
