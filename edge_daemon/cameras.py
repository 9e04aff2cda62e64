"""Camera ids: the one policy for every use of a peer-supplied id (output topic, metric label, log field,
per-camera state), and per-camera counters that unconfigured or hostile ids cannot evict.

An id is 1..64 characters of ``A-Z a-z 0-9 . _ -``, starting with a letter or a digit; ``unknown`` is
reserved. Anything else (``/``, spaces, control characters, non-ASCII, too long, not a string) is never used
as a topic, label or log value: the message is answered on the ``unknown`` topic.

Metric labels are decided from the configuration alone, so every process labels an id the same way:
configured cameras by their id, every other valid id as ``_other``, unreadable or invalid ids as
``unknown``. The label set is bounded by the config, whatever peers send.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Iterable

__all__ = [
    "MAX_CAMERA_ID",
    "UNKNOWN_CAMERA",
    "OTHER_CAMERAS",
    "CAMERA_ID_RULE",
    "is_camera_id",
    "camera_id_problem",
    "camera_or_unknown",
    "CameraLabels",
    "CameraCounters",
]

MAX_CAMERA_ID = 64
UNKNOWN_CAMERA = "unknown"  # topic and label of messages whose camera id is missing or invalid
OTHER_CAMERAS = "_other"  # metric label of valid ids that are not in the config
CAMERA_ID_RULE = f"1..{MAX_CAMERA_ID} characters of A-Z a-z 0-9 . _ -, starting with a letter or digit"
_CAMERA_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_CAMERA_ID - 1}}}")


def camera_id_problem(value) -> str | None:
    """None when ``value`` is a valid camera id, else why not (one line, no echo of the value)."""
    if not isinstance(value, str):
        return f"camera_id must be a string, got {type(value).__name__}"
    if value == UNKNOWN_CAMERA:
        return f"camera_id {UNKNOWN_CAMERA!r} is reserved"
    if _CAMERA_ID.fullmatch(value) is None:
        return f"camera_id must be {CAMERA_ID_RULE}"
    return None


def is_camera_id(value) -> bool:
    return camera_id_problem(value) is None


def camera_or_unknown(value) -> str:
    return value if is_camera_id(value) else UNKNOWN_CAMERA


class CameraLabels:
    """The ``camera`` metric label of a camera id, from the configured ids only (same in every process)."""

    def __init__(self, configured: Iterable[str] = ()):
        self.configured = tuple(dict.fromkeys(configured))
        self._known = set(self.configured)

    def label(self, camera_id: str) -> str:
        if camera_id in self._known:
            return camera_id
        return OTHER_CAMERAS if is_camera_id(camera_id) else UNKNOWN_CAMERA

    def __call__(self, camera_id: str) -> dict:
        return {"camera": self.label(camera_id)}

    def values(self) -> tuple[str, ...]:
        """Every label value this policy can give (zero counters are declared for each)."""
        return (*self.configured, OTHER_CAMERAS, UNKNOWN_CAMERA)


class CameraCounters:
    """Per-camera counters from 0: ``next(camera_id) -> (n, epoch)``.

    The ``pinned`` ids (configured cameras, ``unknown``) keep their counter for the life of the process.
    Other ids share a table of ``limit`` entries, the least recently used forgotten first; a forgotten id
    that comes back restarts at 0 under a new ``epoch``, so whoever numbers records with it can tell a
    restart from a continuation. Epochs are wall-clock ns, strictly increasing in a process, and so also
    differ between two runs of the daemon."""

    def __init__(self, pinned: Iterable[str] = (), limit: int = 1024, clock=time.time_ns):
        self.limit = limit
        self._clock = clock
        self._last_epoch = 0
        start = self._new_epoch()
        self._pinned: dict[str, list[int]] = {cam: [0, start] for cam in pinned}
        self._others: OrderedDict[str, list[int]] = OrderedDict()

    def _new_epoch(self) -> int:
        self._last_epoch = max(self._clock(), self._last_epoch + 1)
        return self._last_epoch

    def _entry(self, camera_id: str) -> list[int]:
        entry = self._pinned.get(camera_id)
        if entry is not None:
            return entry
        entry = self._others.get(camera_id)
        if entry is not None:
            self._others.move_to_end(camera_id)
            return entry
        entry = self._others[camera_id] = [0, self._new_epoch()]
        if len(self._others) > self.limit:
            self._others.popitem(last=False)
        return entry

    def next(self, camera_id: str) -> tuple[int, int]:
        entry = self._entry(camera_id)
        n = entry[0]
        entry[0] += 1
        return n, entry[1]

    def __len__(self) -> int:
        return len(self._pinned) + len(self._others)
