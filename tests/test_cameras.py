"""Camera ids: one policy for topics, labels and logs; labels from the config; counters peers cannot evict."""

from __future__ import annotations

import pytest

from edge_daemon.cameras import (
    OTHER_CAMERAS,
    UNKNOWN_CAMERA,
    CameraCounters,
    CameraLabels,
    camera_id_problem,
    camera_or_unknown,
)
from edge_daemon.config import ConfigError, config_from_mapping


@pytest.mark.parametrize("good", ["cam1", "A", "9", "a" * 64, "line-2.cam_left", "unknown2", "Unknown"])
def test_valid_ids(good):
    assert camera_id_problem(good) is None and camera_or_unknown(good) == good


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "a" * 65,
        "a/b",
        "cam1/map",
        "a b",
        "cam\r",
        "cam\n",
        "tab\t",
        "\x00",
        "ünï",
        "_other",
        "-a",
        ".a",
        "unknown",
        7,
        None,
        b"cam1",
        ["cam1"],
    ],
)
def test_invalid_ids_become_unknown(bad):
    assert camera_id_problem(bad) and camera_or_unknown(bad) == UNKNOWN_CAMERA


def test_labels_come_from_the_config_only():
    labels = CameraLabels(["cam1", "cam2", "cam1"])
    assert labels.values() == ("cam1", "cam2", OTHER_CAMERAS, UNKNOWN_CAMERA)
    assert labels("cam1") == {"camera": "cam1"}
    assert [labels.label(c) for c in ("late", "x0001", "a/b", "unknown", "")] == [
        "_other",
        "_other",
        "unknown",
        "unknown",
        "unknown",
    ]
    other = CameraLabels(["cam2", "cam1"])  # another process, another order of arrival: same labels
    assert all(labels.label(c) == other.label(c) for c in ("cam1", "late", "a/b"))


def test_counters_pinned_ids_are_never_evicted():
    ticks = iter(range(100, 10**6))
    counters = CameraCounters(["cam1", "unknown"], limit=4, clock=lambda: next(ticks))
    assert [counters.next("cam1")[0] for _ in range(3)] == [0, 1, 2]
    epoch = counters.next("cam1")[1]
    first = counters.next("x0")
    for i in range(1, 50):
        counters.next(f"x{i}")
    assert counters.next("cam1") == (4, epoch)  # churn of 50 ids through 4 entries: cam1 untouched
    again = counters.next("x0")  # forgotten: restarts at 0 under a new epoch
    assert again[0] == 0 and again[1] > first[1] and len(counters) <= 2 + 4


def test_counters_keep_recent_ids_and_epochs_increase():
    counters = CameraCounters([], limit=2, clock=lambda: 5)  # a clock that stands still
    a0, b0 = counters.next("a"), counters.next("b")
    assert counters.next("a") == (1, a0[1])  # "a" used last: "b" is the oldest
    counters.next("c")
    assert counters.next("a") == (2, a0[1]) and counters.next("b")[0] == 0
    assert b0[1] > a0[1]  # strictly increasing even when the clock does not move


@pytest.mark.parametrize("cid", ["a/b", "unknown", "a b", "x" * 65])
def test_config_refuses_ids_breaking_the_policy(cid):
    with pytest.raises(ConfigError, match=r"cameras\[0\]\.id: camera_id"):
        config_from_mapping({"engine": {"bundle": "x"}, "cameras": [{"id": cid}]})
