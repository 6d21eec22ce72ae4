"""How a rehearsal deals one data set out to its virtual volunteers.

    iid              shuffled, then dealt round-robin: every share looks like the whole
    by-field:NAME    records grouped by the value of field NAME; each group goes to its own
                     volunteers (split among several when there are more volunteers than groups)
    dirichlet:ALPHA  label skew: for each value of the `instruction` field (the task), the
                     shares of its records follow Dirichlet(ALPHA); small ALPHA, few tasks each
    dirichlet:ALPHA:NAME  the same over the values of field NAME

Every share gets at least one record; the deal is reproducible from the seed.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_LABEL_FIELD = "instruction"


class SplitError(ValueError):
    """The split cannot be made as asked (one line, for the CLI)."""


@dataclass(frozen=True)
class Split:
    kind: str  # iid | by-field | dirichlet
    field: str = ""
    alpha: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> Split:
        kind, _, rest = spec.partition(":")
        if kind == "iid" and not rest:
            return cls("iid")
        if kind == "by-field" and rest:
            return cls("by-field", field=rest)
        if kind == "dirichlet" and rest:
            alpha_text, _, field = rest.partition(":")
            try:
                alpha = float(alpha_text)
            except ValueError:
                alpha = 0.0
            if alpha > 0:
                return cls("dirichlet", field=field or DEFAULT_LABEL_FIELD, alpha=alpha)
        raise SplitError(f"--split {spec!r}: expected iid, by-field:NAME or dirichlet:ALPHA[:NAME] "
                         "(ALPHA > 0)")

    def deal(self, rows: Sequence[dict], n: int, seed: int = 0) -> list[list[dict]]:
        """`rows` dealt into `n` non-empty shares."""
        if n < 1:
            raise SplitError("need at least one volunteer")
        if len(rows) < n:
            raise SplitError(f"{len(rows)} records cannot give {n} volunteers one record each")
        rng = random.Random(seed)
        if self.kind == "iid":
            order = list(rows)
            rng.shuffle(order)
            return [order[i::n] for i in range(n)]
        groups = _groups(rows, self.field)
        if self.kind == "by-field":
            return _by_group(groups, n, rng)
        return _fill_empty(_dirichlet(groups, n, self.alpha, seed), rng)


def _groups(rows: Sequence[dict], field: str) -> list[list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if field not in row:
            raise SplitError(f"a record has no field {field!r} to split by")
        groups[json.dumps(row[field], sort_keys=True, default=str)].append(row)
    return [groups[k] for k in sorted(groups)]


def _by_group(groups: list[list[dict]], n: int, rng: random.Random) -> list[list[dict]]:
    """Each volunteer holds records of one group (of several when there are fewer volunteers)."""
    if n <= len(groups):
        shares: list[list[dict]] = [[] for _ in range(n)]
        for i, group in enumerate(groups):
            shares[i % n].extend(group)
        return shares
    owners: list[list[int]] = [[] for _ in groups]
    for volunteer in range(n):  # volunteers dealt to groups round-robin
        owners[volunteer % len(groups)].append(volunteer)
    shares = [[] for _ in range(n)]
    for group, members in zip(groups, owners, strict=True):
        order = list(group)
        rng.shuffle(order)
        for i, volunteer in enumerate(members):
            shares[volunteer] = order[i::len(members)]
    return _fill_empty(shares, rng)


def _dirichlet(groups: list[list[dict]], n: int, alpha: float, seed: int) -> list[list[dict]]:
    rng = np.random.default_rng(seed)
    shares: list[list[dict]] = [[] for _ in range(n)]
    for group in groups:
        cuts = (np.cumsum(rng.dirichlet([alpha] * n)) * len(group)).astype(int)[:-1]
        order = rng.permutation(len(group))
        for volunteer, part in enumerate(np.split(order, cuts)):
            shares[volunteer].extend(group[int(i)] for i in part)
    return shares


def _fill_empty(shares: list[list[dict]], rng: random.Random) -> list[list[dict]]:
    """Moves one record from the largest share to each empty one."""
    for share in shares:
        if not share:
            largest = max(shares, key=len)
            share.append(largest.pop(rng.randrange(len(largest))))
    return shares


def write_shares(shares: list[list[dict]], paths: Sequence[Path]) -> None:
    for share, path in zip(shares, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in share),
                        encoding="utf-8")
