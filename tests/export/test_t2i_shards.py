"""Text-to-image runs in shards (runtime/shards.py) and served requests (runtime/serving.py)
draw what one process draws from the same prompts: every worker encodes the run's prompt list
as a single run does, so shards split across prompts change nothing. Fixtures: conftest.py."""
import io

import numpy as np
import pytest

pytest.importorskip("torch")

from edgediff.runtime import Pipeline  # noqa: E402
from edgediff.runtime.serving import Engine  # noqa: E402
from edgediff.runtime.shards import WorkerOptions, local_runner, make_spec, read_shards, run_shards  # noqa: E402

PROMPTS = ["a cat", "a dog", "a cat"]


def test_prompt_run_in_shards_equals_one_run(t2i_text, tmp_path, one_thread):
    with Pipeline.from_bundle(t2i_text) as pipe:
        whole = pipe(3, prompt=PROMPTS, steps=2, guidance=2.0, seed=5, first=1)
    spec = make_spec(t2i_text, 9, 4, n=3, prompts=PROMPTS, steps=2, guidance=2.0, seed=5, first=1)
    run_shards(spec, tmp_path / "o", local_runner(spec, WorkerOptions(batch=3, threads=1)))
    got = read_shards(tmp_path / "o")
    np.testing.assert_array_equal(got["images"], whole.images)
    np.testing.assert_array_equal(got["prompt_index"], whole.prompt_index)
    assert list(got["prompts"]) == list(whole.prompts) == ["a cat", "a dog"]


def test_served_prompt_requests(t2i_text, one_thread):
    with Pipeline.from_bundle(t2i_text) as pipe:
        engine = Engine(pipe)
        bodies = [{"prompt": "a cat", "seed": 1, "n": 2, "steps": 2, "format": "npz"},
                  {"prompt": "a dog", "seed": 2, "steps": 2, "format": "npz"}]
        answers = engine.run([engine.parse(b) for b in bodies])
        assert [a[2] for a in answers] == [3, 3]
        alone = pipe(2, prompt="a cat", seed=1, steps=2).images
        with np.load(io.BytesIO(answers[0][0])) as z:
            np.testing.assert_array_equal(z["images"], alone)
        with pytest.raises(Exception, match="give 'prompt'"):
            engine.parse({"class": 1})
