"""kill -9 of the coordinator at chosen and random points, and of its SuperLink, with volunteers running.

One project, two real `loracommons join` volunteers that run throughout, and a sequence of
coordinator starts; each but the last ends in a crash. Rounds last about a second, so every kill is
aimed at a state seen in the coordinator's event lines, never at a time since start:

    admission   kill -9 while the second reply of a round is being admitted (its first update is
                recorded; admission slowed to 1 s per reply, the kill lands within 0.8 s of the
                `test_admitting` line that follows the round's first `update`)
    publishing  kill -9 within 1 s after the first release file of a round started to be written,
                while the release is written or renamed into place but not yet recorded (each file
                write and the final record slowed by 0.4 s: a 2 s window)
    random      kill -9 at a random time in the 3 s after a round opened: anywhere in a round
                (admission, close, publish, the next open)
    superlink   kill -9 of the SuperLink alone while a round is open after a release: the
                coordinator must notice and stop with an error; the volunteers, not restarted,
                must reconnect to the next SuperLink
    final       a normal start that must finish every round, the last two run by it

While the kills are aimed the project asks for more rounds than can run (the coordinator never
finishes by itself before its kill); the final start's total is set from what was done by then.

Delays come from a seeded RNG (LC_FAULT_SEED, else the time; the seed is in the results and in
failure messages). After every crash, at rest: no torn blob, every release folder verifies as a
chain from v1, the database records only releases that are on disk. At the end: no round open, a
round closed without an adapter only when fewer than `min_volunteers` updates were admitted, one
release per aggregated round with no version lost or duplicated, the whole chain with its files
verifies, each release names exactly its round's admitted updates, and each volunteer is credited
once per aggregated round it was admitted in.
"""

from __future__ import annotations

import os
import random
import re
import time
from functools import partial
from pathlib import Path

import pytest

from loracommons.coordinator.releases import verify_local_chain
from loracommons.coordinator.store import Store
from loracommons.protocol import PublicKey, processes
from loracommons.protocol.release import updates_digest
from tests.e2e.procs import free_port, release_chain, wait_for
from tests.security.community import (
    Community,
    fingerprint,
    make_project,
    record_result,
    torn_blobs,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

UNREACHABLE_ROUNDS = 10_000
"""The project's rounds while kills are aimed: no coordinator can finish before its kill."""
MIN_VOLUNTEERS = 2
_EVENT = re.compile(r"^\d\d:\d\d:\d\d (\w+) ?(.*)$")


def since_last(names: list[str], event: str) -> list[str]:
    """The event names after the last `event` (all of them when it never fired)."""
    return names[len(names) - names[::-1].index(event):] if event in names else names


def second_reply_admitting(names: list[str]) -> bool:
    """A round's first update is recorded and the next reply is being admitted."""
    current = since_last(names, "round_open")
    return "round_open" in names and "update" in current and current[-1] == "test_admitting"


def release_writing(names: list[str]) -> bool:
    return "test_release_write" in since_last(names, "round_open")


def round_opened(names: list[str]) -> bool:
    return bool(names) and names[-1] == "round_open"


def round_open_after_release(names: list[str]) -> bool:
    """A round of this start is open after a release of this start: volunteers are connected, mid-run."""
    return "published" in names and "round_closed" in names and round_opened(names)


#: name, coordinator launcher delays, state that arms the kill, range of the random wait after it (s)
TRIALS = [
    ("admission", {"admit_delay": 1.0}, second_reply_admitting, (0.0, 0.8)),
    ("publishing", {"publish_delay": 0.4}, release_writing, (0.0, 1.0)),
    ("random", {}, round_opened, (0.0, 3.0)),
]


def events(community: Community, log: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for line in community.log(log).splitlines() if (m := _EVENT.match(line))]


def reached(community: Community, log: str, state) -> bool:  # noqa: ANN001 (a predicate above)
    return state([name for name, _ in events(community, log)])


def at_rest(project: Path) -> dict:
    """What a crash left: checked before the next start repairs anything."""
    store = Store(project)
    try:
        recorded = store.releases()
        open_round = store.current_round()
        open_updates = len(store.round_updates(open_round.round)) if open_round else None
    finally:
        store.close()
    chain = release_chain(project)  # every v* folder, verified from v1 against the release key
    on_disk = [m.version for m in chain]
    assert [r.version for r in recorded] == list(range(1, len(recorded) + 1))
    assert set(r.version for r in recorded) <= set(on_disk), (recorded, on_disk)
    assert torn_blobs(project) == []
    releases = project / "releases"
    leftovers = sorted(p.name for p in releases.glob(".*")) if releases.exists() else []
    return {"recorded_versions": [r.version for r in recorded], "folders": on_disk,
            "unrecorded_folders": sorted(set(on_disk) - {r.version for r in recorded}),
            "release_temp_dirs": leftovers, "open_round": open_round.round if open_round else None,
            "open_round_updates": open_updates}


def next_round(project: Path) -> int:
    """The round a start would run first: the one left open, else the one after the last closed."""
    store = Store(project)
    try:
        open_round = store.current_round()
        return open_round.round if open_round else store.last_closed_round() + 1
    finally:
        store.close()


def ledger(project: Path, fingerprints: list[str]) -> dict:
    """Rounds, their admitted updates, releases and each volunteer's credit, read from the store."""
    store = Store(project)
    try:
        rounds = store.rounds()
        admitted = {row.round: [u for u in store.round_updates(row.round) if u.outcome == "admitted"]
                    for row in rounds}
        return {"rounds": rounds, "admitted": admitted, "releases": store.releases(),
                "volunteers": [store.volunteer(fp) for fp in fingerprints]}
    finally:
        store.close()


def set_rounds(project: Path, rounds: int) -> None:
    import tomllib

    from loracommons.coordinator.config import ProjectConfig, write_default_toml

    obj = tomllib.loads((project / "project.toml").read_text())
    obj["round"]["rounds"] = rounds
    write_default_toml(project / "project.toml", ProjectConfig.from_dict(obj))


def aim_kill(community: Community, coordinator, log: str, state, window: tuple[float, float],  # noqa: ANN001
             rng: random.Random, what: str, procs: list) -> float:
    """Wait for `state` in the coordinator's event lines, then kill -9 it a random time later."""
    wait_for(partial(reached, community, log, state), 240, what, interval=0.05, procs=[coordinator, *procs])
    wait = rng.uniform(*window)
    time.sleep(wait)
    assert coordinator.poll() is None, f"{what}: the coordinator ended before its kill"
    community.kill9(coordinator)
    return wait


@pytest.fixture(scope="module")
def crash_run(tmp_path_factory, tiny_base, honest) -> dict:
    seed = int(os.environ.get("LC_FAULT_SEED") or time.time())
    rng = random.Random(seed)
    workdir = tmp_path_factory.mktemp("crash")
    project = make_project(workdir, tiny_base, round={
        "rounds": UNREACHABLE_ROUNDS, "volunteers_per_round": 2, "min_volunteers": MIN_VOLUNTEERS,
        "timeout_s": 60.0, "publish_every": 1,
        # init's default for a project with an end: each restart rebuilds its rounds' scheduled rates,
        # and the final start's shorter total moves the schedule mid-project
        "lr_schedule": "cosine"})
    community = Community(workdir)
    port, http_port = free_port(), free_port()
    out: dict = {"seed": seed, "trials": []}
    volunteers: list = []
    try:
        for index, (name, delays, state, window) in enumerate(TRIALS):
            log = f"coordinator{index}.log"
            coordinator = community.coordinator(project, port, http_port, log=log, **delays)
            if not volunteers:
                volunteers = [community.node(None, f"127.0.0.1:{port}", honest.data[i], honest.keys[i],
                                             f"vol{i}") for i in range(2)]
            wait = aim_kill(community, coordinator, log, state, window, rng,
                            f"{state.__name__} before the {name} kill (seed {seed})", volunteers)
            at = at_rest(project)
            at.update(trial=name, wait_s=round(wait, 3),
                      events=[event for event, _ in events(community, log)][-4:])
            out["trials"].append(at)

        # The SuperLink dies mid-run, with a round open and the volunteers connected.
        log = "coordinator-superlink.log"
        coordinator = community.coordinator(project, port, http_port, log=log)
        wait_for(partial(reached, community, log, round_open_after_release), 240,
                 f"a round open after a release, before the SuperLink kill (seed {seed})", interval=0.05,
                 procs=[coordinator, *volunteers])
        processes.kill_group(int((project / "flower" / "superlink.pid").read_text()))
        wait_for(lambda: coordinator.poll() is not None, 60, "the coordinator to notice its SuperLink died")
        out["superlink"] = {"coordinator_exit": coordinator.returncode, "state": at_rest(project),
                            "log": community.log(log)}

        # The last start runs the round left open (or the next) and one more, to its end.
        out["final_first"] = first = next_round(project)
        out["rounds"] = first + 1
        set_rounds(project, out["rounds"])
        final = community.coordinator(project, port, http_port, log="coordinator-final.log")
        wait_for(lambda: final.poll() is not None, 400, f"the resumed run to finish (seed {seed})",
                 procs=volunteers)
        out["final_exit"] = final.returncode
        out["final_log"] = community.log("coordinator-final.log")[-3000:]
        out["volunteers_alive"] = all(v.poll() is None for v in volunteers)
        out["volunteer_logs"] = [community.log(f"vol{i}.log")[-2000:] for i in range(2)]
    finally:
        community.stop_all()
    out["project"] = project
    out["fingerprints"] = [fingerprint(key) for key in honest.keys[:2]]
    return out


def test_every_crash_leaves_a_verifiable_state(crash_run):
    names = [t["trial"] for t in crash_run["trials"]]
    assert names == [name for name, *_ in TRIALS]
    trials = {t["trial"]: t for t in crash_run["trials"]}  # at_rest() asserted the invariants
    # The kills landed where they were aimed: a round half admitted, a release half published.
    admission = trials["admission"]
    assert admission["open_round"] is not None and admission["open_round_updates"] >= 1, admission
    publishing = trials["publishing"]
    assert publishing["release_temp_dirs"] or publishing["unrecorded_folders"], publishing
    record_result("faults", "coordinator_kill9", {
        "tries": len(crash_run["trials"]), "seed": crash_run["seed"],
        "trials": [{k: t[k] for k in ("trial", "wait_s", "recorded_versions", "unrecorded_folders",
                                      "release_temp_dirs", "open_round", "open_round_updates")}
                   for t in crash_run["trials"]]})


def test_superlink_crash_stops_the_coordinator_and_volunteers_reconnect(crash_run):
    superlink = crash_run["superlink"]
    # its one error line; the ServerApp thread's own traceback may print after it
    tail = superlink["log"][-3000:]
    assert superlink["coordinator_exit"] == 1 and "SuperLink exited" in superlink["log"], tail
    assert crash_run["volunteers_alive"], crash_run["volunteer_logs"]  # never restarted by the test
    book = ledger(crash_run["project"], crash_run["fingerprints"])
    after = [row for row in book["rounds"] if row.round >= crash_run["final_first"]]
    assert [row.round for row in after] == list(range(crash_run["final_first"], crash_run["rounds"] + 1))
    for row in after:  # both volunteers came back by themselves and contributed to every later round
        signers = {u.fingerprint for u in book["admitted"][row.round]}
        assert row.status == "aggregated" and signers == set(crash_run["fingerprints"]), (row, signers)
    record_result("faults", "superlink_restart", {
        "tries": 1, "coordinator_exit": superlink["coordinator_exit"], "volunteers_reconnected": True,
        "survived": True})


def test_resume_loses_and_duplicates_no_release(crash_run):
    project = crash_run["project"]
    assert crash_run["final_exit"] == 0, crash_run["final_log"]
    book = ledger(project, crash_run["fingerprints"])
    rounds = book["rounds"]
    assert [row.round for row in rounds] == list(range(1, crash_run["rounds"] + 1))  # none lost or open
    aggregated = [row.round for row in rounds if row.status == "aggregated"]
    for row in rounds:  # a round closes without an adapter only when too few updates were admitted
        assert row.status == "aggregated" or (row.status == "skipped" and row.admitted < MIN_VOLUNTEERS), row
    manifests = verify_local_chain(project, PublicKey.load(project / "keys" / "release_key.pub"))
    assert [m.version for m in manifests] == list(range(1, len(aggregated) + 1))
    assert [m.round for m in manifests] == aggregated  # one release per aggregated round, in order
    assert [(r.version, r.round) for r in book["releases"]] == [(m.version, m.round) for m in manifests]
    for m in manifests:  # each release names exactly its round's admitted updates
        assert m.updates_digest == updates_digest(u.update_digest for u in book["admitted"][m.round]), m.round
    for volunteer in book["volunteers"]:  # credited once per aggregated round it was admitted in
        mine = [u for r in aggregated for u in book["admitted"][r] if u.fingerprint == volunteer.fingerprint]
        assert len({u.round for u in mine}) == len(mine), volunteer  # one admitted update per round
        assert volunteer.rounds_contributed == len(mine), volunteer
        assert volunteer.examples_contributed == sum(u.examples for u in mine), volunteer
    assert torn_blobs(project) == []
    assert not [p for p in (project / "blobs" / "sha256").iterdir() if p.name.startswith(".tmp-")]
    assert not list((project / "releases").glob(".*"))
    assert not (project / "tmp").exists() or not any((project / "tmp").iterdir())
    record_result("faults", "resume_after_crashes", {
        "tries": len(crash_run["trials"]) + 1, "releases": len(manifests), "rounds": len(rounds),
        "skipped_rounds": len(rounds) - len(aggregated), "lost": 0, "duplicated": 0, "torn_blobs": 0})
