"""Shared-memory slot ring: views, attach from another process, free list, stale segment cleanup."""

from __future__ import annotations

import subprocess
import sys
import uuid

import numpy as np
import pytest

from edge_daemon.shm import SHM_DIR, FreeList, ShmError, SlotRing, cleanup_stale, segment_prefix


@pytest.fixture
def ring():
    r = SlotRing.create(f"t{uuid.uuid4().hex[:8]}", slots=4, slot_bytes=100)
    yield r
    r.close()


def test_views_are_disjoint(ring):
    a = ring.view(0, (10, 10), np.uint8)
    b = ring.view(1, (10, 10), np.uint8)
    a[:] = 1
    b[:] = 2
    assert a.sum() == 100 and b.sum() == 200
    assert not np.shares_memory(a, b)
    with pytest.raises(ShmError, match="does not fit"):
        ring.view(0, (11, 10), np.uint8)
    with pytest.raises(ShmError, match="out of range"):
        ring.view(4, (1,), np.uint8)


def test_other_process_writes_slot(ring):
    code = (
        "import numpy as np; from edge_daemon.shm import SlotRing; "
        f"r = SlotRing.attach({ring.name!r}, 4, 100); v = r.view(2, (5, 10), np.uint16); v[:] = 7; "
        "del v; r.close()"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert (ring.view(2, (5, 10), np.uint16) == 7).all()
    assert (SHM_DIR / ring.name).exists()  # the attaching process did not unlink it


def test_free_list():
    free = FreeList(2)
    a, b = free.acquire(), free.acquire()
    assert {a, b} == {0, 1} and free.acquire() is None and free.in_use == 2
    free.release(a)
    assert free.available == 1
    with pytest.raises(ShmError, match="not in use"):
        free.release(a)


def test_cleanup_stale():
    instance = f"t{uuid.uuid4().hex[:8]}"
    leftover = SlotRing.create(instance, 1, 10)
    name = leftover.name
    leftover._shm.close()  # the process "died" without unlinking
    assert (SHM_DIR / name).exists()
    assert cleanup_stale(instance) == [name]
    assert not [p for p in SHM_DIR.iterdir() if p.name.startswith(segment_prefix(instance))]


def test_attach_size_checked(ring):
    with pytest.raises(ShmError, match="expected"):
        SlotRing.attach(ring.name, 100, 100)
