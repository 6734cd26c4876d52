"""Handing freed heap back to the OS (ktm.memory) and the trainer callback that decides when (ReleaseFreedMemory)."""

import ctypes
import platform
import sys
from types import SimpleNamespace

import pytest

from ktm import memory
from ktm.training import callbacks
from ktm.training.callbacks import ReleaseFreedMemory

GIB = 2**30


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc on Linux")
def test_release_returns_heap_that_malloc_kept():
    # 4096 blocks of 64 KiB (below glibc's mmap threshold, so they live in the heap); freeing all but the last
    # leaves 256 MiB that free() cannot hand back (the last block pins the top of the heap): malloc_trim can
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(64 * 1024) for _ in range(4096)]
    try:
        for block in blocks:
            ctypes.memset(block, 1, 64 * 1024)  # touched, so resident
        for block in blocks[:-1]:
            libc.free(block)
        before = memory.rss_bytes()
        assert memory.release_freed_heap() is True
        assert before - memory.rss_bytes() > 128 * 2**20
    finally:
        libc.free(blocks[-1])


@pytest.mark.parametrize("rss_gb, left_gb, devices, released_at", [
    ([2, 3, 5.9, 5.5], 2, 1, []),               # never above a quarter of 24 GB
    ([2, 7, 3, 5.5, 12], 2, 1, [1, 4]),         # above 6 GB; then not until above it again (10 GB over the 2 left)
    ([2, 7, 8, 8.5, 9.5], 7, 1, [1, 4]),        # live memory of 7 GB: the next release waits for 2.4 GB more
    ([1, 3.5, 1.4], 1, 4, [1]),                 # four processes on the node: judged by a quarter of each one's 6 GB
])
def test_release_when_rss_is_above_a_quarter_of_the_machine_and_grew_since_the_last(monkeypatch, rss_gb, left_gb,
                                                                                    devices, released_at):
    current = {"rss": None, "released": []}

    def release():
        current["released"].append(batch)
        current["rss"] = int(left_gb * GIB)  # what the release leaves
        return True

    monkeypatch.setattr(callbacks, "rss_bytes", lambda: current["rss"])
    monkeypatch.setattr(callbacks, "machine_bytes", lambda: 24 * GIB)
    monkeypatch.setattr(callbacks, "release_freed_heap", release)
    guard, trainer = ReleaseFreedMemory(), SimpleNamespace(num_devices=devices)
    for batch, rss in enumerate(rss_gb):
        current["rss"] = int(rss * GIB)
        guard.on_train_batch_end(trainer, None, None, None, batch)
    assert current["released"] == released_at


def test_release_is_a_no_op_without_proc(monkeypatch):
    monkeypatch.setattr(callbacks, "rss_bytes", lambda: None)
    monkeypatch.setattr(callbacks, "release_freed_heap", lambda: pytest.fail("released without an RSS to judge by"))
    guard = ReleaseFreedMemory()
    for batch in range(3):
        guard.on_validation_batch_end(SimpleNamespace(num_devices=1), None, None, None, batch)
