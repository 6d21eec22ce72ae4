"""A volunteer in its own network namespace loses its link for 30 s mid-round, then gets it back.

The test creates a network namespace and a veth pair with a private /30 of its own (host side
.1, namespace side .2); the coordinator's SuperLink listens on the host-side address (not on
loopback), two volunteers on the host and one inside the namespace connect to it. Once the
namespaced volunteer has contributed, the host side of its link is set down while it trains,
for 30 s (packets are dropped: its connections hang rather than fail), then up again. Nothing may
crash, the rounds during the outage close at their timeout with the two others, and the namespaced
volunteer must contribute again in a later round without being restarted. Namespace and veth are
removed in teardown. Skipped only where `ip netns` is missing or not permitted.
"""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass

import pytest

from loracommons.coordinator.store import Store
from tests.e2e.procs import free_port, read_json, wait_for
from tests.security.community import Community, fingerprint, make_project, record_result

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

OUTAGE_S = 30.0
TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Netns:
    name: str
    host_if: str
    host_ip: str
    ns_ip: str

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def free_subnet() -> ipaddress.IPv4Network:
    """A random /30 in 10.200.0.0/13 that no interface of this machine uses."""
    used = ip("-4", "-o", "addr").stdout
    rng = random.Random()
    for _ in range(100):
        second, third, fourth = rng.randint(200, 207), rng.randint(0, 255), 4 * rng.randint(0, 63)
        net = ipaddress.ip_network(f"10.{second}.{third}.{fourth}/30")
        if not any(str(host) in used for host in net):
            return net
    raise RuntimeError("no free private /30 found")


@pytest.fixture
def netns():
    if shutil.which("ip") is None:
        pytest.skip("the `ip` command (iproute2) is not installed")
    tag = os.urandom(3).hex()
    name, host_if, ns_if = f"lctest-{tag}", f"lc{tag}h", f"lc{tag}n"
    added = ip("netns", "add", name, check=False)
    if added.returncode != 0:
        pytest.skip(f"`ip netns add` is not permitted here: {added.stderr.strip()}")
    try:
        net = free_subnet()
        host_ip, ns_ip = (str(h) for h in net.hosts())
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", name)
        ip("addr", "add", f"{host_ip}/30", "dev", host_if)
        ip("link", "set", host_if, "up")
        for args in (("addr", "add", f"{ns_ip}/30", "dev", ns_if), ("link", "set", ns_if, "up"),
                     ("link", "set", "lo", "up")):
            ip("netns", "exec", name, "ip", *args)
        yield Netns(name, host_if, host_ip, ns_ip)
    finally:
        for pid in ip("netns", "pids", name, check=False).stdout.split():  # only what this test started
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        ip("link", "del", host_if, check=False)  # removes both ends
        ip("netns", "del", name, check=False)
    assert name not in ip("netns", "list").stdout


def outcomes(project, key) -> list[tuple[int, str]]:  # noqa: ANN001
    """(round, outcome or reason) of every update signed by `key`, read in-process from the store
    (every round's: rounds last about a second, so `status()`'s recent updates are too few)."""
    store = Store(project)
    try:
        rows = [u for r in store.rounds() for u in store.round_updates(r.round)]
    finally:
        store.close()
    fp = fingerprint(key)
    return [(u.round, u.reason or u.outcome) for u in rows if u.fingerprint == fp]


def admitted_rounds(project, key) -> list[int]:  # noqa: ANN001
    return [r for r, outcome in outcomes(project, key) if outcome == "admitted"]


def test_volunteer_loses_its_link_for_30_s(tmp_path, tiny_base, honest, netns):
    # rounds = 0: run until stopped (sub-second rounds would use up any fixed number before the
    # volunteer is back); the test stops the coordinator once it has seen what it waits for
    project = make_project(tmp_path, tiny_base, round={"rounds": 0, "volunteers_per_round": 3,
                                                        "min_volunteers": 2, "timeout_s": TIMEOUT_S})
    community = Community(tmp_path)
    port, http_port = free_port(), free_port()
    remote_key = honest.key("remote")
    try:
        coordinator = community.coordinator(project, port, http_port, host=netns.host_ip, wait_nodes=3)
        address = f"{netns.host_ip}:{port}"
        steady = [community.node(None, address, honest.data[i], honest.keys[i], f"steady{i}")
                  for i in range(2)]
        remote = community.node(None, address, honest.extra_data("remote", 60), remote_key, "remote",
                                prefix=netns.exec_prefix())
        everyone = [coordinator, *steady, remote]
        first = wait_for(lambda: admitted_rounds(project, remote_key), 240,
                         "the namespaced volunteer's first update", procs=everyone)[0]

        def training_later_round() -> bool:
            state = read_json(tmp_path / "remote.json") or {}
            return state.get("state") == "training" and state.get("round", 0) > first

        wait_for(training_later_round, 120, "the namespaced volunteer to train again", interval=0.05,
                 procs=everyone)
        cut_round = read_json(tmp_path / "remote.json")["round"]
        ip("link", "set", netns.host_if, "down")
        down_at = time.monotonic()
        try:
            wait_for(lambda: time.monotonic() - down_at > OUTAGE_S, OUTAGE_S + 5, "the outage",
                     procs=everyone)
        finally:
            ip("link", "set", netns.host_if, "up")
        back = wait_for(lambda: [r for r in admitted_rounds(project, remote_key) if r > cut_round], 240,
                        "the namespaced volunteer to contribute after the outage", procs=everyone)[0]
        recovered_s = time.monotonic() - down_at - OUTAGE_S
        alive = all(p.poll() is None for p in everyone)
    finally:
        community.stop_all()
    store = Store(project)
    try:
        rounds = {r.round: r for r in store.rounds()}
    finally:
        store.close()
    assert alive
    assert rounds[cut_round].status == "aggregated" and rounds[cut_round].admitted >= 2
    # From the cut to the comeback every round aggregated, the steady two in each. (Earlier rounds
    # are no part of the trial: on a loaded machine the first, which loads the model, can time out.)
    for r in range(cut_round, back + 1):
        assert rounds[r].status == "aggregated", rounds[r]
    for key in honest.keys:
        assert set(admitted_rounds(project, key)) >= set(range(cut_round, back + 1))
    record_result("faults", "network_partition_30s", {
        "tries": 1, "survived": True, "cut_in_round": cut_round, "contributed_again_in_round": back,
        "seconds_to_recover_after_link_up": round(recovered_s, 1),
        "remote_outcomes": outcomes(project, remote_key)})
