"""Reward stats read from disk: bad values are named, never turned into NaN rewards."""

from __future__ import annotations

import pytest

from arvid.data.types import BlockLayout
from arvid.tokenizer.reward import CurationRecords, RewardStats, labels_for

GOOD = {"quality": "mse", "mean_distortion": 0.3, "std_distortion": 0.1, "mean_length": 12.0,
        "std_length": 4.0, "num_samples": 10}


def test_nan_or_non_numeric_stats_are_refused_with_the_key():
    """Found in a correctness review: a NaN mean made every reward NaN and labels_for then labelled
    each video with assignment 0 (all-smallest) without an error; a null or text value failed with
    float()'s message, naming neither the file nor the key."""
    layout = BlockLayout((2, 2), (4, 8))
    rec = CurationRecords(layout, [0, 0, 0, 0], [0, 1, 2, 3], [[.5, .5], [.1, .1], [.4, .4], [0., 0.]], [0], [4],
                          "mse")
    # the good stats label the distortion-free assignment 3 (= (8, 8)): R = 1.2 * 3 - 0.8 * 1 = 2.8
    vids, labels, rewards = labels_for(rec, RewardStats.from_dict(GOOD), 1.2, 0.8)
    assert labels.tolist() == [3] and rewards[0] == pytest.approx(2.8)
    for key in ("mean_distortion", "mean_length"):
        for bad in (float("nan"), float("inf"), "nan"):
            with pytest.raises(ValueError, match=f"run/stats.json: RewardStats.{key} must be a finite number"):
                RewardStats.from_dict({**GOOD, key: bad}, source="run/stats.json")
    for key, bad in (("std_length", None), ("mean_distortion", "high"), ("num_samples", [3])):
        with pytest.raises(ValueError, match=f"run/stats.json: reward stats key '{key}' must be a number"):
            RewardStats.from_dict({**GOOD, key: bad}, source="run/stats.json")
    with pytest.raises(ValueError, match="run/stats.json: RewardStats.std_distortion must be a positive"):
        RewardStats.from_dict({**GOOD, "std_distortion": 0.0}, source="run/stats.json")
