"""Process memory on CPU: the resident set size, the machine's memory, and handing freed heap back to the OS.

Why the last: glibc's malloc keeps memory that torch's CPU allocator freed in its arenas instead of returning it,
and with batches of very different lengths the kept memory ratchets up. Measured on `read_commitpack_k2`
(2-core Xeon, 24 GiB): the bytes of live torch tensors stayed flat at 0.47 GB while the RSS climbed from 6.9 to
11.9 GB in 12 steps, and the kernel's OOM killer ended the run at 24 GB near step 52; glibc's malloc_trim(0)
after each step held it at 1.4-1.7 GB. Plain python, no torch, so the benchmark and the trainer share it.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path


def status_kib(field: str) -> int | None:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM, ...); None without /proc (macOS, Windows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int | None:
    """This process's resident set size; None where /proc does not exist."""
    kib = status_kib("VmRSS")
    return None if kib is None else kib * 1024


def machine_bytes() -> int | None:
    """Physical memory of the machine (a container's own limit can be lower); None where unknown."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def release_freed_heap() -> bool:
    """Return the heap memory malloc holds but nothing uses to the OS (glibc's malloc_trim(0)). False where the
    C library has no malloc_trim (musl, macOS, Windows): nothing to do there."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        return False
    return True
