"""The TSTR protocol: a fixed CNN, several seeds, matched steps."""

from __future__ import annotations

import numpy as np

from app.ml.datasets import load_dataset
from app.ml.protocol import tstr_report


def test_tstr_report_ranks_good_and_useless_training_data() -> None:
    digits = load_dataset("digits")
    train, test = digits.split(0.3)
    shuffled = np.random.default_rng(0).permutation(train.labels)  # "synthetic" data whose labels mean nothing
    report = tstr_report((train.images, train.labels), (train.images, shuffled), (test.images, test.labels), 10,
                         seeds=[0, 1])
    assert report["real"]["mean"] > 0.6 and len(report["real"]["scores"]) == 2
    assert report["tstr"]["mean"] < 0.3 and report["tstr_to_real_ratio"]["mean"] < 0.4
    assert report["protocol"]["matched_steps"] == 4 * -(-2 * len(train) // 128)
    for arm in ("real_matched_steps", "real_augmented_matched_steps", "real_plus_synthetic_matched_steps"):
        assert 0 <= report[arm]["mean"] <= 1 and report[arm]["std"] >= 0
