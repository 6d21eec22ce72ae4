"""One async version's buffer: a `Round` whose updates may start from older versions.

Under `[round] schedule = "async"` a version is a store round row. Each task sent while version v is
open trains from version v-1 and carries its own nonce and serial (the task's `round` field), recorded
in the store (`tasks`). An update names its task by (serial, nonce); admission then checks it against
that task's claims and base, and its staleness tau = v - task.version (versions closed since its base):

    unknown nonce -> wrong_nonce      serial never issued -> future_base
    task already used -> replayed     tau > max_staleness -> stale

An admitted update is folded as its delta against its own base, with weight n_i s(tau_i)
(`config.staleness_factor`) in the version's mean: the aggregator sees G + (X_i - X_base_i), so every
rule (median clip, trimmed mean, Krum, free riders) acts on the update's own delta, a stale update
counts less than a fresher one beside it, and a buffer of fresh updates (tau = 0) folds exactly as a
sync round. See DESIGN "Buffered asynchronous aggregation".

    buf = Buffer(cfg, v, tensors, digest, nonce, tasks=store.task, bases=..., last_serial=...)
    record = buf.offer(envelope); buf.last_task   # the task it named (mark it used with the record)
    result = buf.close()                          # as Round.close
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np

from loracommons.coordinator.admission import AdmissionContext, Refused, Verdict
from loracommons.coordinator.config import ProjectConfig, staleness_factor
from loracommons.coordinator.round import Round, UpdateRecord
from loracommons.coordinator.rows import TaskRow
from loracommons.protocol.envelope import Envelope, UpdateManifest
from loracommons.protocol.errors import Reason

Tensors = Mapping[str, np.ndarray]


class Buffer(Round):
    """The open version: `offer` each envelope (any base within max_staleness), `close` after K."""

    one_per_signer = False  # one update per task: a fast volunteer may send several per version

    def __init__(
        self,
        cfg: ProjectConfig,
        version: int,
        global_tensors: Tensors,
        global_digest: str,
        nonce: str,
        *,
        tasks: Callable[[str], TaskRow | None],
        bases: Callable[[str], Tensors | None],
        last_serial: Callable[[], int],
        allowlist: Collection[str] = frozenset(),
        banned: Collection[str] = frozenset(),
        spill_dir: str | Path | None = None,
        rng: np.random.Generator | None = None,
    ) -> None:
        super().__init__(cfg, version, nonce, global_tensors, global_digest, allowlist=allowlist,
                         banned=banned, spill_dir=spill_dir, rng=rng)
        self._global = dict(global_tensors)
        self._tasks, self._bases, self._last_serial = tasks, bases, last_serial
        self._ctx = replace(self._ctx, admitted=frozenset(), resolve=self._resolve)
        self._used: set[str] = set()  # nonces admitted into this buffer
        self._restoring = False
        self._envelope_digest = ""
        self._base: Tensors | None = None
        self._tau: int | None = None
        self.last_task: TaskRow | None = None

    @property
    def admitted(self) -> int:
        """Updates admitted into this version so far (close once `buffer_size` are)."""
        return len(self._used)

    def offer(self, envelope: Envelope, *, restoring: bool = False) -> UpdateRecord:
        """Admit one envelope against the task it names. `restoring`: it was admitted into this
        version before a restart (its task is marked used by that admission), fold it again."""
        self.last_task, self._base, self._tau = None, None, None
        self._restoring = restoring
        try:
            self._envelope_digest = envelope.digest
        except TypeError:
            self._envelope_digest = ""
        record = super().offer(envelope)
        if record.accepted and self.last_task is not None:
            self._used.add(self.last_task.nonce)
        if record.accepted and self._tau and record.update_digest in self._claims:
            # its eval scored an older version, not this version's base: the version's federated
            # eval (issue 16) takes only the claims of updates trained from that base
            train, _ = self._claims[record.update_digest]
            self._claims[record.update_digest] = (train, None)
        return replace(record, staleness=self._tau)

    def _resolve(self, manifest: UpdateManifest) -> AdmissionContext:
        ctx = replace(self._ctx, resolve=None)
        if manifest.project_id != self.cfg.project.id:
            return ctx  # check_claims refuses it as wrong_project
        issued = self._last_serial()
        if manifest.round > issued:
            raise Refused(Reason.FUTURE_BASE, f"names task {manifest.round}; only {issued} were issued")
        task = self._tasks(manifest.nonce)
        if task is None or task.serial != manifest.round:
            raise Refused(Reason.WRONG_NONCE, f"names no task this coordinator sent (task {manifest.round})")
        self.last_task = task
        if task.version > self.number:
            raise Refused(Reason.FUTURE_BASE, f"task {task.serial} is for version {task.version}, "
                                              f"the open version is {self.number}")
        self._tau = tau = self.number - task.version
        self._check_task(task, tau)
        base = self._global if tau == 0 else self._bases(task.base_adapter_digest)
        if base is None:
            raise Refused(Reason.STALE, f"the adapter of version {task.base_version} is no longer kept")
        self._base = base
        expected = replace(self.expected, round=task.serial, nonce=task.nonce,
                           base_adapter_digest=task.base_adapter_digest)
        return replace(ctx, expected=expected, global_tensors=base)

    def _check_task(self, task: TaskRow, tau: int) -> None:
        again = self._restoring and task.update_digest == self._envelope_digest
        if task.nonce in self._used or (task.status == "used" and not again):
            raise Refused(Reason.REPLAYED, f"task {task.serial} already had an update admitted "
                                           f"({(task.update_digest or '')[:16]})")
        limit = self.cfg.round.max_staleness
        if tau > limit:
            raise Refused(Reason.STALE, f"trained from version {task.base_version}, {tau} versions "
                                        f"behind the latest (max_staleness {limit})")
        if task.status == "expired":
            raise Refused(Reason.LATE, f"task {task.serial} expired unanswered before this reply")

    def _prepared(self, verdict: Verdict) -> Verdict:
        """A stale update as G + (X - X_base), its own delta, with s(tau) on its weight in the mean."""
        tau, base = self._tau or 0, self._base
        if tau == 0 or base is None or verdict.tensors is None:
            return verdict
        rebased = {}
        for name, value in verdict.tensors.items():
            cut = tuple(slice(0, n) for n in np.shape(value))  # nested ranks: the columns it trained
            delta = np.asarray(value, np.float64) - base[name][cut]
            rebased[name] = (self._global[name][cut] + delta).astype(np.float32)
        return replace(verdict, tensors=rebased, weight_factor=staleness_factor(self.cfg, tau))
