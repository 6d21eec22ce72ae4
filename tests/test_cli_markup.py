"""Text from a server, a coordinator or a volunteer is printed as text, never Rich markup (issue 15, 9).

Before: a project id `[link=https://evil.example]...[/link]` in the downloader's error line became a
terminal hyperlink (and the brackets vanished); a coordinator's note reason did the same in `join`'s
status lines, and an event line in the coordinator's live view.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

from rich.console import Console

HOSTILE = "[link=https://evil.example]click[/link][bold red]x[/]"


def rendered(renderable) -> str:  # noqa: ANN001
    console = Console(file=io.StringIO(), width=400, color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def test_download_error_line_prints_the_servers_text_as_is(tmp_path):
    from starlette.responses import Response

    from tests.download import served_project

    with served_project(tmp_path / "coordinator") as (url, _, _, hostile):
        hostile.overrides["/api/project"] = lambda h: Response(json.dumps({"id": HOSTILE}),
                                                               media_type="application/json")
        proc = subprocess.run([sys.executable, "-m", "loracommons", "download", url, "--out",
                               str(tmp_path / "adapter")], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "COLUMNS": "400"})
    assert proc.returncode == 1
    assert HOSTILE in proc.stderr and "\x1b]8;" not in proc.stderr, proc.stderr


def test_fail_prints_the_message_as_is(capsys):
    from loracommons import cli_common

    cli_common.err_console.file = sys.stderr  # capsys replaced stderr after the console was made
    cli_common.fail(f"bad input {HOSTILE}")
    assert HOSTILE in capsys.readouterr().err


def test_join_status_lines_print_the_coordinators_note_as_is():
    from loracommons import cli_join

    view = cli_join.JoinView(None, live=False)
    with cli_join.console.capture() as captured:
        view.event("note", {"round": 2, "outcome": "rejected", "reason": HOSTILE})
        view.event("failed", {"reason": HOSTILE})
    assert captured.get().count(HOSTILE) == 2


def test_coordinator_live_view_prints_event_lines_as_is():
    from loracommons.cli_coordinator import _status_table
    from loracommons.coordinator.rows import RoundCounts, StoreStatus, UpdateCounts, VolunteerCounts

    status = StoreStatus(RoundCounts(0, 0, None, {}), VolunteerCounts(0, 0, 0, 0),
                         UpdateCounts(0, 1, {HOSTILE: 1}), None, (), ())
    text = rendered(_status_table(status, {"fleet": "x", "http": "y"}, [f"12:00:00 update reason={HOSTILE}"]))
    assert text.count(HOSTILE) == 2
