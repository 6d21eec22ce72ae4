"""`loracommons coordinator ...` for tests, with scheduling hooks that change no decision.

    LC_TEST_WAIT_NODES=9 python tests/security/coordinator_launcher.py coordinator start DIR ...

    LC_TEST_WAIT_NODES     the first round starts only once this many nodes are connected (the
                           real coordinator starts at [round] min_volunteers): every node of a
                           test then takes part from round 1, whatever order they connected in
    LC_TEST_PUBLISH_DELAY  seconds slept after each release file is written and before the
                           release is recorded: widens the publishing window a kill -9 aims at
                           (lines `test_release_write NAME` and `test_release_renamed` mark it)
    LC_TEST_ADMIT_DELAY    seconds slept before each admission: widens the admission window
                           (a line `test_admitting` marks each)

Admission, aggregation, publishing and resume are the installed code, unchanged.
"""

from __future__ import annotations

import os
import sys
import time


def mark(event: str, details: str = "") -> None:
    """A line like the coordinator's own `--plain` event lines, for a test to aim a kill at."""
    print(f"{time.strftime('%H:%M:%S')} {event} {details}".rstrip(), flush=True)


def install_hooks() -> None:
    from loracommons.coordinator import admission, releases, rounds
    from loracommons.coordinator import round as round_module
    from loracommons.coordinator.store import Store

    wait_nodes = int(os.environ.get("LC_TEST_WAIT_NODES") or 0)
    publish_delay = float(os.environ.get("LC_TEST_PUBLISH_DELAY") or 0)
    admit_delay = float(os.environ.get("LC_TEST_ADMIT_DELAY") or 0)
    if wait_nodes:
        original = rounds.Coordinator.wait_for_nodes
        waited = []

        def wait_for_nodes(self, grid):  # noqa: ANN001, ANN202
            if waited:  # later rounds: the installed rule
                return original(self, grid)
            need = max(wait_nodes, self.cfg.round.min_volunteers)
            while not self.stop.is_set():
                nodes = sorted(grid.get_node_ids())
                if len(nodes) >= need:
                    waited.append(True)
                    return nodes
                self.stop.wait(0.5)
            return None

        rounds.Coordinator.wait_for_nodes = wait_for_nodes
    if publish_delay:
        write, add_release = releases.synced_write, Store.add_release

        def slow_write(path, data):  # noqa: ANN001, ANN202
            mark("test_release_write", path.name)
            write(path, data)
            time.sleep(publish_delay)

        def slow_add_release(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            mark("test_release_renamed")
            time.sleep(publish_delay)  # the folder is renamed into place, not yet recorded
            return add_release(self, *args, **kwargs)

        releases.synced_write = slow_write
        Store.add_release = slow_add_release
    if admit_delay:
        admit = admission.admit

        def slow_admit(envelope, ctx):  # noqa: ANN001, ANN202
            mark("test_admitting")
            time.sleep(admit_delay)
            return admit(envelope, ctx)

        round_module.admit = slow_admit  # where `Round.offer` looks it up


def main(argv: list[str]) -> None:
    install_hooks()
    from loracommons.cli import app

    app(prog_name="loracommons", args=argv)


if __name__ == "__main__":
    main(sys.argv[1:])
