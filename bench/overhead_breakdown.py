"""Where a LoRA Commons round's seconds go, from the arrival times of the processes' own lines.

Used by overhead_bench.py. For round r and the volunteer whose update the coordinator
admitted last (the one the round waited for):

    dispatch   round_open -> the task reaches that volunteer's ClientApp (its line about
               round r-1's outcome, which rides on round r's task): coordinator push,
               SuperNode pull, node runner's ask, task download
    volunteer  -> its `update sent` line: decode + load adapter + train + sign
    reply      -> the coordinator's `update` line for it: reply upload through SuperNode and
               SuperLink, the coordinator's poll, admission
    close      last `update` -> round_closed: aggregation and the round's store writes
    next       round_closed -> the next round_open (the last round: -> finished): the signed
               release, the next task

Round 1 has no previous outcome to carry, so its dispatch and volunteer parts are unknown.
"""

from __future__ import annotations

import re

EVENT = re.compile(r"^\d\d:\d\d:\d\d (\w+) (.*)$")
NOTE = re.compile(r"round (\d+): your update was ")
SENT = re.compile(r"round (\d+): update sent \(.*, ([\d.]+) s\)\s*$")
IDENTITY = re.compile(r"^volunteer ([0-9a-f-]+): ")

Lines = list[tuple[float, str]]


def coordinator_events(lines: Lines) -> list[tuple[float, str, dict[str, str]]]:
    events = []
    for stamp, line in lines:
        match = EVENT.match(line)
        if match:
            details = dict(kv.split("=", 1) for kv in match.group(2).split() if "=" in kv)
            events.append((stamp, match.group(1), details))
    return events


def volunteer_times(lines: Lines) -> tuple[str, dict[int, float], dict[int, float]]:
    """(signer prefix, round -> when its task arrived, round -> when its update was sent)."""
    signer, arrived, sent = "", {}, {}
    for stamp, line in lines:
        if match := IDENTITY.match(line):
            signer = match.group(1).replace("-", "")
        elif match := NOTE.search(line):
            arrived[int(match.group(1)) + 1] = stamp
        elif match := SENT.search(line):
            sent[int(match.group(1))] = stamp
    return signer, arrived, sent


def breakdown(coordinator: Lines, volunteers: list[Lines], rounds: int) -> list[dict]:
    events = coordinator_events(coordinator)
    opens = {int(d["round"]): t for t, e, d in events if e == "round_open"}
    closed = {int(d["round"]): t for t, e, d in events if e == "round_closed"}
    finished = next((t for t, e, _ in events if e == "finished"), None)
    updates: dict[tuple[int, str], float] = {}
    for t, e, d in events:
        if e == "update" and d.get("signer"):
            updates.setdefault((int(d["round"]), d["signer"]), t)
    people = [volunteer_times(lines) for lines in volunteers]
    rows = []
    for r in range(1, rounds + 1):
        end = opens.get(r + 1, finished)
        if r not in opens or r not in closed or end is None:
            continue
        seen = [(updates[(r, signer[:16])], arrived.get(r), sent.get(r))
                for signer, arrived, sent in people if (r, signer[:16]) in updates]
        if not seen:
            continue
        admitted_at, arrived_at, sent_at = max(seen, key=lambda s: s[0])
        parts = {
            "dispatch_s": arrived_at - opens[r] if arrived_at else None,
            "volunteer_s": sent_at - arrived_at if arrived_at and sent_at else None,
            "reply_s": admitted_at - sent_at if sent_at else None,
            "close_s": closed[r] - max(s[0] for s in seen),
            "next_s": end - closed[r],
        }
        rows.append({"round": r, **{k: None if v is None else round(v, 3) for k, v in parts.items()}})
    return rows
