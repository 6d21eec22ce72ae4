"""What each node is sent of the global adapter (`protocol/downlink.py`), and what each holds.

Per node the coordinator remembers the digest of the last global the node answered a task
for (it rebuilt and checked that one before training, so it holds it): the next task then
carries a delta against it when that packs smaller. In a mode that leaves a factor frozen
(`ffa`: A), only the trained factors travel and the node regenerates the rest from the seed.
A node that refuses a rebuilt downlink (`downlink_mismatch`: another seed or library) gets
the whole adapter from then on; one that refuses a delta (`base_unavailable`: restarted) or
fails gets no delta until it answers again. Nothing here trusts a node: whatever it is sent,
it checks the full digest before training.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from loracommons.coordinator.blobs import BlobStore, StoreError
from loracommons.coordinator.initial import decode_adapter
from loracommons.protocol import modes
from loracommons.protocol.downlink import Downlink, Held, build
from loracommons.protocol.errors import Reason

KEEP_VERSIONS = 3
"""Recent globals kept decoded for deltas; an older base is read back from the blob store."""
_REFUSAL = re.compile(r"\b(downlink_mismatch|base_unavailable):")


def refusal_reason(error_text: str) -> Reason | None:
    """The downlink reason code a volunteer's error reply names (`Volunteer.receive`), if any."""
    found = _REFUSAL.search(error_text)
    return Reason(found.group(1)) if found else None


def regenerates(mode: str) -> bool:
    """Whether a node can rebuild the factors this mode never trains from the seed (`ffa`: A)."""
    return not all(modes.get(mode).trains(factor) for factor in modes.FACTORS)


class Downlinks:
    """The downlink of each node's task; one per coordinator, kept across rounds."""

    def __init__(self, mode: str, dtype: str, blobs: BlobStore | None = None) -> None:
        self.mode, self.dtype, self.blobs = mode, dtype, blobs
        self.holds: dict[int, str] = {}  # node -> digest of the global it last answered a task for
        self.whole: set[int] = set()  # nodes that refused a rebuilt downlink: every tensor, from now on
        self._versions: dict[str, Mapping[str, np.ndarray]] = {}
        self._built: dict[tuple[str, str, bool], tuple[Downlink, bytes]] = {}

    def remember(self, digest: str, tensors: Mapping[str, np.ndarray]) -> None:
        """Keep a version decoded (the most recent KEEP_VERSIONS): deltas are taken against them."""
        self._versions.pop(digest, None)
        self._versions[digest] = tensors
        while len(self._versions) > KEEP_VERSIONS:
            del self._versions[next(iter(self._versions))]

    def for_node(self, node: int, digest: str, tensors: Mapping[str, np.ndarray]) -> tuple[Downlink, bytes]:
        """(header, bytes) of the global `digest` for `node`: the smallest it can rebuild exactly."""
        if next(reversed(self._versions), None) != digest:  # a new global: what was built is stale
            self.remember(digest, tensors)
            self._built.clear()
        regenerate = regenerates(self.mode) and node not in self.whole
        held_digest = self.holds.get(node, "")
        key = (digest, held_digest, regenerate)
        if key not in self._built:
            held = self._version(held_digest) if held_digest and held_digest != digest else None
            self._built[key] = build(tensors, self.mode, self.dtype, regenerate=regenerate, held=held)
        return self._built[key]

    def answered(self, node: int, digest: str) -> None:
        """`node` replied with an update to a task on global `digest`: it holds that one."""
        self.holds[node] = digest

    def failed(self, node: int, reason: Reason | None) -> None:
        """`node` replied with an error (or not at all): send it no delta until it answers again."""
        self.holds.pop(node, None)
        if reason == Reason.DOWNLINK_MISMATCH:
            self.whole.add(node)

    def _version(self, digest: str) -> Held | None:
        if digest not in self._versions:
            try:
                if self.blobs is None or not self.blobs.has(digest):
                    return None
                self.remember(digest, decode_adapter(self.blobs.get(digest)))
            except StoreError:  # a damaged blob: the node gets no delta, the whole global instead
                return None
        return Held(digest, self._versions[digest])
