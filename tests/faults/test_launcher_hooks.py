"""The test launcher's scheduling hooks reach the code they are meant to slow down.

The crash trials aim kills at windows these hooks widen; a hook bound to a name the
coordinator no longer calls widens nothing, and the kill then lands wherever it happens to.
"""

from __future__ import annotations

from loracommons.coordinator import releases
from loracommons.coordinator import round as round_module
from loracommons.coordinator.store import Store
from tests.security import coordinator_launcher


def test_admit_delay_slows_the_admission_round_offer_calls(monkeypatch):
    original = round_module.admit
    monkeypatch.setattr(round_module, "admit", original)  # restored after the test
    monkeypatch.setenv("LC_TEST_ADMIT_DELAY", "0.5")
    monkeypatch.delenv("LC_TEST_PUBLISH_DELAY", raising=False)
    monkeypatch.delenv("LC_TEST_WAIT_NODES", raising=False)
    coordinator_launcher.install_hooks()
    assert round_module.admit is not original
    assert round_module.admit.__name__ == "slow_admit"


def test_publish_delay_slows_release_writes_and_the_record(monkeypatch):
    monkeypatch.setattr(releases, "synced_write", releases.synced_write)
    monkeypatch.setattr(Store, "add_release", Store.add_release)
    monkeypatch.setenv("LC_TEST_PUBLISH_DELAY", "0.1")
    monkeypatch.delenv("LC_TEST_ADMIT_DELAY", raising=False)
    monkeypatch.delenv("LC_TEST_WAIT_NODES", raising=False)
    coordinator_launcher.install_hooks()
    assert releases.synced_write.__name__ == "slow_write"
    assert Store.add_release.__name__ == "slow_add_release"
