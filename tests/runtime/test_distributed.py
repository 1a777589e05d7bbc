"""Sharded generation (runtime/shards.py) in-process and on a local Ray (runtime/distributed.py):
shards equal one single-process run bit for bit, a killed worker's shard is redone, an
interrupted run resumes, and the CLI refuses bad combinations in one line."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from cli_helpers import run
from edgediff.runtime import Pipeline
from edgediff.runtime.errors import InvalidInput
from edgediff.runtime.interrupts import Interrupted
from edgediff.runtime.shards import RUN_FILE, WorkerOptions, local_runner, make_spec, read_shards, run_shards

CHOICE = dict(sampler="ddpm", steps=4, guidance=2.0, seed=7)     # stochastic: every step draws noise


def single(bundle, n, **kw):
    with Pipeline.from_bundle(bundle, threads=1) as pipe:
        out = pipe(n, **{**CHOICE, **kw})
    return out.images, out.labels


def spec_of(bundle, count, shard_size, **kw):
    return make_spec(bundle, count, shard_size, **{**CHOICE, **kw})


def test_local_shards_equal_one_run(tiny_bundle, tmp_path):
    images, labels = single(tiny_bundle, 11, classes=[2, 5], first=3)
    spec = spec_of(tiny_bundle, 11, 4, classes=[2, 5], first=3)
    done = []
    assert run_shards(spec, tmp_path / "o", local_runner(spec, WorkerOptions(batch=3, threads=1)),
                      progress=done.append) == {"done": 3, "skipped": 0}
    got = read_shards(tmp_path / "o")
    assert sum(done) == 11 and len(done) > 3            # the bar moves within shards (per model call)
    assert np.array_equal(got["images"], images) and np.array_equal(got["labels"], labels)
    assert sorted(p.name for p in (tmp_path / "o" / "shards").iterdir()) == \
        [f"shard-{k:06d}.{ext}" for k in range(3) for ext in ("npz", "png")]


def test_ray_shards_equal_one_run(ray_local, tiny_bundle, tmp_path, capsys):
    """`generate --ray --out-dir`: two actors, shards (5) not a multiple of the batch (3), and
    the images are those of `generate --npz` in one process (batch 16)."""
    base = ["generate", str(tiny_bundle), "-n", "17", "--sampler", "ddpm", "--steps", "4", "--guidance", "2",
            "--seed", "7", "--threads", "1"]
    assert run(base + ["--npz", str(tmp_path / "one.npz")], capsys)[0] == 0
    code, out, err = run(base + ["--batch", "3", "--out-dir", str(tmp_path / "o"), "--shard-size", "5",
                                 "--ray", "--workers", "2", "--npz", str(tmp_path / "all.npz")], capsys)
    assert code == 0, err
    assert "17 samples in 4 shards" in out
    got, one, merged = read_shards(tmp_path / "o"), np.load(tmp_path / "one.npz"), np.load(tmp_path / "all.npz")
    assert np.array_equal(got["images"], one["images"]) and np.array_equal(got["labels"], one["labels"])
    assert sorted(merged.files) == sorted(one.files) and np.array_equal(merged["images"], one["images"])


def test_killed_worker_is_replaced_and_nothing_lost(ray_local, tiny_bundle, tmp_path):
    """SIGKILL the process drawing the long shard while it draws (at the bar's first move): the
    shard goes to the restarted actor, and the run equals one process, each shard written once."""
    from edgediff.runtime.distributed import RayRunner

    choice = dict(steps=150)            # shard 0: 3 batches of 4, shard 1: one sample, done long before
    images, _ = single(tiny_bundle, 13, **choice)
    spec = spec_of(tiny_bundle, 13, 12, **choice)
    runner = RayRunner(spec, WorkerOptions(batch=4), workers=2)
    pids = dict(zip(map(id, runner.actors), ray_local.get([a.pid.remote() for a in runner.actors])))
    killed, drawn = [], []

    def kill_shard_0s_worker(k):
        drawn.append(k)
        for actor, shard in list(runner.in_flight.values()):
            if shard.index == 0 and not killed:
                killed.append(pids[id(actor)])
                os.kill(killed[-1], signal.SIGKILL)

    run_shards(spec, tmp_path / "o", runner, progress=kill_shard_0s_worker)
    assert killed and runner.retries >= 1
    assert np.array_equal(read_shards(tmp_path / "o")["images"], images)
    assert len(json.loads((tmp_path / "o" / RUN_FILE).read_text())["done"]) == 2
    assert sum(drawn) == 13                 # the bar ends at the run's samples: nothing counted twice


def test_interrupted_run_resumes(ray_local, tiny_bundle, tmp_path):
    """A run interrupted after two shards resumes on Ray; a shard whose file was damaged since is redrawn."""
    from edgediff.runtime.distributed import RayRunner

    images, _ = single(tiny_bundle, 14)
    spec = spec_of(tiny_bundle, 14, 3)
    first = local_runner(spec, WorkerOptions(threads=1))

    def interrupted(shards):
        for k, item in enumerate(first(shards)):
            if k == 2:
                raise Interrupted(signal.SIGINT)
            yield item

    with pytest.raises(Interrupted):
        run_shards(spec, tmp_path / "o", interrupted)
    assert len(read_state(tmp_path / "o")["done"]) == 2
    with pytest.raises(Exception, match="holds a run already"):
        run_shards(spec, tmp_path / "o", first)
    (tmp_path / "o" / "shards" / "shard-000001.png").write_bytes(b"damaged")
    runner = RayRunner(spec, WorkerOptions(), workers=2)
    assert run_shards(spec, tmp_path / "o", runner, resume=True) == {"done": 4, "skipped": 1}
    assert np.array_equal(read_shards(tmp_path / "o")["images"], images)
    with pytest.raises(Exception, match="seed differ"):
        run_shards(spec_of(tiny_bundle, 14, 3, seed=8), tmp_path / "o", first, resume=True)


def read_state(out):
    return json.loads((out / RUN_FILE).read_text())


def test_cli_out_dir_and_its_refusals(tiny_bundle, tmp_path, capsys):
    out = str(tmp_path / "o")
    base = ["generate", str(tiny_bundle), "-n", "6", "--steps", "2", "--threads", "1"]
    assert run(base + ["--out-dir", out, "--shard-size", "4"], capsys)[0] == 0
    assert sorted(read_state(tmp_path / "o")["done"]) == ["0", "1"]
    for extra, words in ((["--out-dir", out], "--resume"), (["--ray"], "go with --out-dir"),
                         (["--out-dir", out, "--out", str(tmp_path / "a.png")], "--out does not go"),
                         (["--out-dir", out, "--resume", "--seed", "3"], "seed differ"),
                         (["--out-dir", str(tmp_path / "p"), "--classes", "99"], "out of range"),
                         (["--out-dir", str(tiny_bundle / "runs")], "inside the bundle"),
                         (["--out-dir", str(tmp_path / "w"), "--workers", "2"], "add --ray"),
                         (["--out-dir", str(tmp_path / "w"), "--npz", str(tiny_bundle / "a.npz")],
                          "inside the bundle")):
        code, _, err = run(base + extra, capsys)
        assert code != 0 and words in err and len(err.strip().splitlines()) == 1, (extra, err)


def test_core_modules_never_import_ray():
    probe = ("import sys; import edgediff.cli, edgediff.runtime.shards, edgediff.runtime.pipeline, "
             "edgediff.runtime.serving, edgediff.runtime.client; "
             "sys.exit('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 0


def _node(cpus, gpus=0, alive=True):
    return {"Alive": alive, "Resources": {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {})}}


def test_placement_counts_each_node_not_the_cluster_total():
    """4 nodes × 4 CPUs hold 16 CPUs, but no actor of 8 threads: refused, not waited for."""
    from edgediff.runtime.distributed import node_capacity

    four = [_node(4) for _ in range(4)]
    with pytest.raises(InvalidInput, match="--threads 8: no Ray node.*largest has 4"):
        node_capacity(four, gpu=False, threads=8)
    assert node_capacity(four, gpu=False, threads=3) == 4            # one per node, not 16 // 3
    assert node_capacity([*four, _node(64, alive=False)], gpu=False, threads=4) == 4     # the dead one is not counted
    assert node_capacity([_node(8), _node(8, 1), _node(8, 2)], gpu=True, threads=1) == 3
    with pytest.raises(InvalidInput, match="has none"):
        node_capacity(four, gpu=True, threads=1)


def test_more_workers_than_the_cluster_places_are_refused(ray_local, tiny_bundle, tmp_path, capsys):
    """Actors beyond the cluster's room would never start, and their shards never run: one line."""
    from edgediff.runtime.distributed import RayRunner

    with pytest.raises(InvalidInput, match="--workers 3: the Ray cluster can place 2 of 1 CPU each"):
        RayRunner(spec_of(tiny_bundle, 4, 2), WorkerOptions(), workers=3)
    base = ["generate", str(tiny_bundle), "-n", "4", "--steps", "2", "--out-dir", str(tmp_path / "o"), "--ray"]
    for extra, words in ((["--workers", "2", "--threads", "2"], "can place 1 of 2 CPUs each"),
                         (["--workers", "1", "--device", "cuda"], "the Ray cluster has none")):
        code, _, err = run(base + extra, capsys)
        assert code != 0 and words in err and len(err.strip().splitlines()) == 1, (extra, err)
    assert not (tmp_path / "o").exists()


def test_resume_hashes_each_shard_file_once(tiny_bundle, tmp_path, capsys, monkeypatch):
    """`--resume --npz` over a finished run checks every shard file once (not once per reader)."""
    import edgediff.runtime.shards as shards

    base = ["generate", str(tiny_bundle), "-n", "6", "--steps", "2", "--threads", "1", "--out-dir", str(tmp_path / "o"),
            "--shard-size", "2"]
    assert run(base, capsys)[0] == 0
    hashed = []
    monkeypatch.setattr(shards, "sha256_file", lambda path, real=shards.sha256_file: hashed.append(path) or real(path))
    code, out, err = run(base + ["--resume", "--npz", str(tmp_path / "all.npz")], capsys)
    assert code == 0, err
    assert "0 drawn now, 3 kept" in out
    assert sorted(hashed) == sorted(set(hashed)) and len(hashed) == 6          # 3 shards × (npz, png)
    assert np.load(tmp_path / "all.npz")["images"].shape[0] == 6


def test_missing_ray_or_gpu_extras_are_named():
    from edgediff.runtime.errors import missing_extra

    serve = ImportError("No module named 'ray.serve'", name="ray.serve")
    assert "pip install 'edgediff[distributed]'" in str(missing_extra(serve))
    trt = str(missing_extra(ImportError("no tensorrt", name="tensorrt")))
    assert "pip install 'edgediff[gpu-cu12]' or 'edgediff[gpu-cu13]'" in trt
