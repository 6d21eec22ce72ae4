"""Flower's `flower-supernode`, unchanged, with its fixed waits paced for quick rounds.

    python -m loracommons.client.supernode --superlink HOST:PORT --isolation process ...

takes exactly `flower-supernode`'s arguments; client/node.py starts the node's
SuperNode this way. What is paced and why: `loracommons.protocol.flower_timing`.
"""

from __future__ import annotations

from loracommons.client.flower_runtime import run_supernode

if __name__ == "__main__":
    run_supernode()
