"""The shipped noisy-image digits classifier (classifier guidance), not the judge."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgediff.digits import classifier as dc                          # noqa: E402
from edgediff.digits import data as digits                            # noqa: E402
from edgediff.digits.demo import ASSETS                               # noqa: E402
from edgediff.export.classifier import load_classifier                # noqa: E402

SHIPPED = ASSETS / "classifier"


def test_shipped_classifier_fits_its_config_and_is_small():
    assert json.loads((SHIPPED / "config.json").read_text()) == dc.CONFIG
    assert (SHIPPED / "model.safetensors").stat().st_size <= 5 * 2**20
    record = json.loads((SHIPPED / "train.json").read_text())
    assert record["schedule"] == dc.SCHEDULE and record["steps"] == dc.HYPER.steps


def test_shipped_classifier_reads_noised_held_out_digits(one_thread):
    """Accurate on clean digits, still well above chance at mid noise (step 250), near chance
    where the signal is gone; the figures the train record keeps."""
    model = load_classifier(dc.CONFIG, SHIPPED / "model.safetensors")
    data = digits.load()
    acc = dc.accuracy(model, data.held_x, data.held_y, steps=(0, 250, 999))
    assert acc[0] >= 0.95 and acc[250] >= 0.8 and acc[999] <= 0.3, acc


def test_train_classifier_one_step(tmp_path, one_thread):
    record = dc.train_classifier(tmp_path / "c", steps=2, progress=False)
    assert np.isfinite(record["final_loss"])
    load_classifier(dc.CONFIG, tmp_path / "c" / "model.safetensors")
