"""Flower's `flower-supernode`, unchanged, with its fixed waits paced for quick rounds.

    python -m loracommons.client.supernode --superlink HOST:PORT --isolation process ...

takes exactly `flower-supernode`'s arguments; client/node.py starts the node's
SuperNode this way. What is paced and why: `loracommons.protocol.flower_timing`.
"""

from __future__ import annotations

import sys

from loracommons.protocol.flower_timing import pace_supernode


def main() -> None:
    pace_supernode()
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"  # Flower's own usage and error lines
    flower_supernode()


if __name__ == "__main__":
    main()
