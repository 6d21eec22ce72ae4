"""Issue 16: the demo's live view shows the community adapter's federated held-out loss and, per
volunteer, the community adapter against its own last update on its held-out data."""

from __future__ import annotations

import json

from rich.console import Console

from loracommons.demo.community import Community, DemoSettings

ROUNDS = [{"round": r, "status": status, "admitted": 2, "rejected": 0, "eval_loss": loss,
           "base_version": r - 1}
          for r, status, loss in ((1, "aggregated", 2.5), (2, "aggregated", 1.75), (3, "open", None))]


def test_view_shows_the_federated_eval_and_each_volunteers_comparison(tmp_path):
    community = Community(tmp_path, DemoSettings(volunteers=2, rounds=3), Console())
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "volunteer-0.json").write_text(json.dumps(
        {"state": "sent", "round": 2, "rounds_sent": 2, "community_loss": 1.6, "own_loss": 1.9}))
    (tmp_path / "logs" / "volunteer-1.json").write_text(json.dumps({"state": "sent", "round": 1,
                                                                   "community_loss": 2.4, "own_loss": None}))
    plan = {"volunteers": [{"name": f"volunteer-{i}", "skills": ["reverse"]} for i in range(2)]}
    console = Console(width=200, record=True)
    console.print(community.view(plan, 0.0, ROUNDS, []))
    text = console.export_text()
    assert "held-out loss 1.750 (federated, scored in round 2)" in text
    assert "community (alone)" in text and "1.600 (1.900)" in text and "2.400 (-)" in text
