"""Content-addressed blobs: immutable byte strings named by their sha256.

    blobs = BlobStore("myproject/blobs")     # files at myproject/blobs/sha256/<hex>
    digest = blobs.put(adapter_bytes)        # idempotent; repairs a damaged copy
    blobs.get(digest)                        # raises BlobCorrupt if the bytes no longer hash to it

Each blob is written with `protocol.durable.atomic_write`, so a final name never holds a
partial file; temporary files a killed writer left are removed when the store opens.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

from loracommons.protocol.durable import TEMP_PREFIX, atomic_write

log = logging.getLogger(__name__)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class StoreError(Exception):
    """A state operation that cannot be done as asked (unknown key, closed round...)."""


class BlobCorrupt(StoreError):
    """A blob's bytes no longer hash to its name."""


class BlobStore:
    """Immutable byte strings named by their sha256, e.g. each version's global adapter."""

    def __init__(self, root: str | Path):
        self.root = Path(root) / "sha256"
        self.root.mkdir(parents=True, exist_ok=True)
        self.clean_temp()

    def clean_temp(self) -> int:
        """Remove temporary files left by a writer that was killed; returns how many."""
        removed = 0
        for leftover in self.root.glob(TEMP_PREFIX + "*"):
            leftover.unlink(missing_ok=True)
            removed += 1
        if removed:
            log.info("removed %d unfinished blob file(s) from %s", removed, self.root)
        return removed

    def path(self, digest: str) -> Path:
        if not isinstance(digest, str) or not _HEX64.match(digest):
            raise StoreError(f"blob name {str(digest)[:80]!r} is not a sha256 hex digest")
        return self.root / digest

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        path = self.path(digest)
        if path.is_file() and _file_sha256(path) == digest:
            return digest
        atomic_write(path, data)  # new, or repairs a damaged copy
        return digest

    def get(self, digest: str) -> bytes:
        path = self.path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"no blob {digest[:16]} in {self.root}") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise BlobCorrupt(f"blob {digest[:16]} is corrupt: its bytes hash to another digest")
        return data


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
