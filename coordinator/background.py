"""One helper thread for a round's numeric work, so that it overlaps the next hash.

hashlib and numpy release the GIL on large buffers: while the caller hashes one payload,
the helper can take a delta norm or fold the previous update. One thread per process,
shared by every round; on a single CPU there is nothing to overlap and callers run inline.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
_HELPER: dict[int, ThreadPoolExecutor] = {}  # per process id: a forked child starts its own


def helper() -> ThreadPoolExecutor | None:
    """The helper thread (started on first use), or None where running inline is faster."""
    if CPUS < 2:
        return None
    pid = os.getpid()
    if pid not in _HELPER:
        _HELPER.clear()
        _HELPER[pid] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lc-round")
        _HELPER[pid].submit(int).result()  # start the thread now, not under the first update
    return _HELPER[pid]
