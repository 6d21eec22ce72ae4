"""Quality: the community adapter against centralized LoRA on pooled data and each volunteer alone.

On the demo's embedded base model and generated skills, non-IID (each volunteer holds
the data of one skill, as in `loracommons demo`), it trains for R rounds of S steps
(default: the demo's tuned settings, `DemoSettings`):

    centralized-ffa / -full   one trainer on the pooled data, N x S steps per round
                              (same total steps and examples as the federation)
    pooled-same-time          one trainer on the pooled data, S steps per round (ffa): the
                              sequential steps, so the wall-clock, of one volunteer
    local-only                each volunteer alone on its own data, S steps per round
    ffa / exact / fedavg      the federation, each volunteer S steps per round
    ffa-bf16                  ffa with bfloat16 payloads (for the communication bench)

and records, per round and method, held-out loss and exact match per skill. The
federated runs also record the bytes each volunteer sends and receives and, for every
round, how far the aggregated ΔW is from the exact weighted mean of the B_i A_i.

The driver is in-process but runs the project's own code end to end: each volunteer is a
`loracommons.client.volunteer.Volunteer` (reads its JSONL file, loads the base, applies
the global adapter, trains with the project's trainer, signs a real envelope) and the
coordinator side is the product's `coordinator.round.Round` (admission, the examples cap,
aggregation and the round's rules), the object `Coordinator.run_round` drives. Only
Flower's transport and the state store are left out.

    python bench/quality_bench.py --workers 2                   # 3 and 6 volunteers, demo's 80 x 10: 1 h+
    python bench/quality_bench.py --workers 2 --methods ffa,centralized-ffa,pooled-same-time,local-only
    python bench/quality_bench.py --workers 2 --rounds 10 --steps 30   # the earlier schedule, ~15 min
    python bench/quality_bench.py --tiny --out /tmp/quality.json
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import benchlib
import numpy as np

from loracommons.demo.community import TARGETS, DemoSettings
from loracommons.protocol.lora import DEMO_MODEL_ID

DEMO = DemoSettings()
FFA_LR = DEMO.learning_rate
"""FFA trains B alone and wants a high rate (the demo's tuned 1e-2)."""
FULL_LORA_LR = 3e-3
"""A and B trained together: in the demo's tuning 1e-2 made full LoRA collapse; 3e-3 trains well."""
SEQ_LEN = 64
WARMUP_STEPS = 5
DEFAULT_OUT = benchlib.RESULTS / "quality.json"
TARGET_RATIOS = {"equal_sequential_steps": 1.1, "equal_total_compute": 2.5}
"""Issue 12: community held-out loss over one pooled-data trainer's, at equal sequential steps (each
volunteer T steps, the trainer T: `pooled-same-time`) and at equal total compute (N x T: centralized)."""


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # federated | centralized | pooled-same-time | local
    mode: str
    lr: float
    dtype: str = "float32"
    downlink: str = "float32"  # [round] downlink_dtype: the global is rounded to it after each round
    server_lr: float = 1.0  # [aggregation] server_lr (bench/server_lr_bench.py sweeps it)


METHODS = (
    Method("centralized-ffa", "centralized", "ffa", FFA_LR),
    # One participant in fedavg mode: its update becomes the adapter unchanged (plain LoRA).
    Method("centralized-full", "centralized", "fedavg", FULL_LORA_LR),
    Method("pooled-same-time", "pooled-same-time", "ffa", FFA_LR),
    Method("local-only", "local", "ffa", FFA_LR),
    Method("ffa", "federated", "ffa", FFA_LR),
    Method("exact", "federated", "exact", FULL_LORA_LR),
    Method("fedavg", "federated", "fedavg", FULL_LORA_LR),
    Method("ffa-bf16", "federated", "ffa", FFA_LR, "bfloat16"),
)
BY_NAME = {m.name: m for m in METHODS}


@dataclass(frozen=True)
class Settings:
    rounds: int = DEMO.rounds
    steps: int = DEMO.steps_per_round
    """Optimizer steps per volunteer per round (centralized: N x this)."""
    n_train: int = DEMO.n_train
    """Training examples per volunteer."""
    n_heldout: int = 50
    """Held-out examples per skill."""
    seed: int = 0
    em_every: int = 2
    """Exact match every this many rounds and after the last (local-only adapters: after the last only)."""
    keep_optimizer: bool = True
    """`[train] keep_optimizer`: volunteers carry AdamW's state and the warmup across rounds."""
    em_local: bool = False
    """Local-only adapters too get exact match every `em_every` rounds (per-checkpoint comparisons)."""
    checkpoints_only: bool = False
    """Evaluate (held-out loss too) only at the exact-match rounds: a sweep that reads checkpoints."""
    lr_schedule: str = "constant"
    """`[round] lr_schedule` of every run's project (over `rounds`)."""


class BenchError(RuntimeError):
    pass


def project_config(method: Method, steps: int, participants: int, s: Settings,  # noqa: ANN201
                   aggregation: dict | None = None):
    from loracommons.coordinator.config import ProjectConfig

    return ProjectConfig.from_dict(
        {
            "project": {"id": "bench-quality", "base_model": DEMO_MODEL_ID, "seed": s.seed},
            "lora": {"r": DEMO.lora_r, "alpha": float(2 * DEMO.lora_r), "target_modules": list(TARGETS)},
            "train": {
                "max_steps": steps,
                "batch_size": DEMO.batch_size,
                "seq_len": SEQ_LEN,
                "learning_rate": method.lr,
                "warmup_steps": WARMUP_STEPS,
                "max_minutes": 60.0,
                "keep_optimizer": s.keep_optimizer,
            },
            "round": {
                "rounds": s.rounds,
                "volunteers_per_round": participants,
                "min_volunteers": participants,
                "downlink_dtype": method.downlink,
                "lr_schedule": s.lr_schedule,
            },
            "aggregation": {"mode": method.mode, "server_lr": method.server_lr, **(aggregation or {})},
            "limits": {"payload_dtype": method.dtype},
        }
    )


# ---------------------------------------------------------------- evaluation


class Evaluator:
    """Held-out loss and exact match per skill of a global adapter, on the shared cached base."""

    def __init__(self, lora, heldout: dict[str, list[dict]]):  # noqa: ANN001
        from loracommons.client.model import load_base

        self.lora = lora
        self.heldout = heldout
        self.base, self.tokenizer = load_base(DEMO_MODEL_ID, device="cpu")

    def __call__(self, tensors: dict[str, np.ndarray], em: bool) -> dict:
        from loracommons.client.evaluate import exact_match, heldout_loss
        from loracommons.client.model import apply_adapter

        model = apply_adapter(self.base, self.lora, tensors, "ffa")
        per_skill = {}
        for skill, records in self.heldout.items():
            row = {"heldout_loss": round(heldout_loss(model, self.tokenizer, records, SEQ_LEN), 5)}
            if em:
                row["exact_match"] = round(exact_match(model, self.tokenizer, records, max_new_tokens=16), 4)
            per_skill[skill] = row
        out = {
            "per_skill": per_skill,
            "mean_heldout_loss": round(float(np.mean([r["heldout_loss"] for r in per_skill.values()])), 5),
        }
        if em:
            out["mean_exact_match"] = round(float(np.mean([r["exact_match"] for r in per_skill.values()])), 4)
        return out


# ---------------------------------------------------------------- exactness


class ExactnessProbe:
    """The exact weighted mean of the B_i A_i of one round, to compare with what aggregation returns."""

    def __init__(self, global_tensors: dict[str, np.ndarray], mode: str, scale: float):
        from loracommons.coordinator.robust import module_pairs
        from loracommons.protocol import modes

        self.pairs = module_pairs(global_tensors)
        self.global_tensors = global_tensors
        self.mode, self.scale = mode, scale
        self.trains_a = modes.get(mode).trains("lora_A")
        self.sums = {m: 0.0 for m in self.pairs}
        self.weight = 0.0

    def add(self, tensors, weight: float) -> None:  # noqa: ANN001
        for module, (a_name, b_name) in self.pairs.items():
            a = tensors[a_name] if self.trains_a else self.global_tensors[a_name]
            b = np.asarray(tensors[b_name], np.float64)
            a = np.asarray(a, np.float64)[: b.shape[1]]  # a nested-rank update: its first rows of A
            self.sums[module] = self.sums[module] + weight * (b @ a)
        self.weight += weight

    def compare(self, result: dict[str, np.ndarray], rank: int) -> dict:
        """Relative Frobenius error of (alpha/r) B'A' against the exact (alpha/r) mean(B_i A_i)."""
        err_sq = norm_sq = best_sq = 0.0
        worst = 0.0
        for module, (a_name, b_name) in self.pairs.items():
            target = self.scale * self.sums[module] / self.weight
            got = self.scale * (
                np.asarray(result[b_name], np.float64) @ np.asarray(result[a_name], np.float64)
            )
            err, norm = np.linalg.norm(got - target) ** 2, np.linalg.norm(target) ** 2
            s = np.linalg.svd(target, compute_uv=False)
            best_sq += float(np.sum(s[rank:] ** 2))
            err_sq, norm_sq = err_sq + err, norm_sq + norm
            worst = max(worst, math.sqrt(err / norm) if norm else 0.0)
        norm = math.sqrt(norm_sq) or 1.0
        return {
            "rel_frobenius_error": math.sqrt(err_sq) / norm,
            "max_module_rel_error": worst,
            "best_rank_r_rel_error": math.sqrt(best_sq) / norm,
        }


# ---------------------------------------------------------------- the in-process federation


def make_volunteers(participants: list[dict], work: Path, on_sent) -> list:  # noqa: ANN001
    from loracommons.client.volunteer import NodeSettings, Volunteer

    out = []
    for p in participants:
        key = benchlib.seeded_identity(work / "identities" / p["name"], p["name"])
        settings = NodeSettings(
            data_path=p["data"], identity_path=str(key), device="cpu", heldout_fraction=0.0, threads=1,
            max_rank=p.get("max_rank"),  # nested ranks (quality_ranks.py); None: the project's
        )
        out.append(Volunteer(settings, on_status=on_sent))
    return out


def federate(
    method: Method,
    participants: list[dict],
    steps: int,
    s: Settings,
    evaluate: Evaluator,
    work: Path,
    label: str,
    log,
    aggregation: dict | None = None,
) -> dict:  # noqa: ANN001
    """R rounds of the real round protocol, in one process; the history of the global adapter."""
    from loracommons.coordinator.downlinks import regenerates
    from loracommons.coordinator.initial import build_initial_adapter, decode_adapter
    from loracommons.coordinator.round import Round
    from loracommons.coordinator.store import new_nonce
    from loracommons.protocol import wire
    from loracommons.protocol.codec import DTYPES, decode_tensors, encode_tensors, round_tensors
    from loracommons.protocol.downlink import Held
    from loracommons.protocol.downlink import build as build_downlink
    from loracommons.protocol.envelope import sha256_hex
    from loracommons.protocol.task import RoundTask

    cfg = project_config(method, steps, len(participants), s, aggregation)
    sent: list[dict] = []
    volunteers = make_volunteers(
        participants, work, lambda state, d: sent.append(d) if state == "sent" else None
    )
    # what the coordinator holds: version 0 rounded to the downlink dtype (coordinator/rounds.py)
    data = encode_tensors(round_tensors(build_initial_adapter(cfg), method.downlink), dtype="float32")
    tensors = decode_adapter(data)
    history, started, held = [], time.monotonic(), None
    for r in range(1, s.rounds + 1):
        rnd = Round(cfg, r, new_nonce(), tensors, sha256_hex(data))
        task_json = rnd.task_bytes
        # every volunteer answered the previous round, so it holds that version: a delta when smaller
        link, down = build_downlink(tensors, cfg.aggregation.mode, method.downlink,
                                    regenerate=regenerates(cfg.aggregation.mode), held=held)
        probe = ExactnessProbe(tensors, cfg.aggregation.mode, cfg.lora.alpha / cfg.lora.r)
        up, up_wire, sent[:] = [], [], []
        for volunteer in volunteers:
            envelope = volunteer.run_round(RoundTask.from_bytes(task_json), down, link)
            record = rnd.offer(envelope)
            if not record.accepted:
                raise BenchError(f"{label}: round {r} update refused: {record.reason}: {record.message}")
            probe.add(decode_tensors(envelope.payload, max_bytes=len(envelope.payload)), record.weight)
            up.append(len(envelope.manifest) + len(envelope.payload) + len(envelope.signature))
            encoding, packed = wire.pack(envelope.payload, DTYPES[method.dtype][1])  # as client_app sends it
            up_wire.append(up[-1] - len(envelope.payload) + len(packed) + len(encoding))
        result = rnd.close()
        if result.tensors is None:
            raise BenchError(f"{label}: round {r} not aggregated: {result.message}")
        row = {
            "round": r,
            "bytes_down_per_volunteer": len(task_json) + len(data),  # the whole adapter, fp32, raw
            "bytes_down_wire_per_volunteer": len(task_json) + len(link.to_bytes()) + len(down),
            "bytes_up_per_volunteer": int(np.mean(up)),
            "bytes_up_wire_per_volunteer": int(np.mean(up_wire)),
            "train_loss": round(float(np.mean([d["train_loss"] for d in sent])), 5),
            "volunteer_seconds": round(sum(d["seconds"] for d in sent), 2),
        }
        held = Held(sha256_hex(data), tensors)
        # what the coordinator stores and sends next round (rounded to the downlink dtype)
        data = encode_tensors(round_tensors(result.tensors, method.downlink), dtype="float32")
        tensors = decode_adapter(data)
        if method.kind == "federated":
            row["exactness"] = probe.compare(tensors, cfg.lora.r)
        em_now = (method.kind != "local" or s.em_local) and s.em_every > 0 and r % s.em_every == 0
        history.append(row)
        if s.checkpoints_only and not (em_now or r == s.rounds):
            continue
        row.update(evaluate(tensors, em=em_now or r == s.rounds))
        log(
            f"{label} round {r}/{s.rounds}: held-out loss {row['mean_heldout_loss']:.3f}"
            + (f", exact match {row['mean_exact_match']:.0%} ("
               + ", ".join(f"{k} {v['exact_match']:.0%}" for k, v in row["per_skill"].items()) + ")"
               if "mean_exact_match" in row else "")
            + f" ({time.monotonic() - started:.0f} s)"
        )
    return {
        "method": method.name,
        "mode": method.mode,
        "learning_rate": method.lr,
        "server_lr": method.server_lr,
        "payload_dtype": method.dtype,
        "downlink_dtype": method.downlink,
        "steps_per_round": steps,
        "participants": [p["name"] for p in participants],
        "seconds": round(time.monotonic() - started, 1),
        "rounds": history,
    }


def run_job(job: dict) -> dict:
    """One (N, method[, volunteer]) run; a top-level function so a worker process can run it."""
    import torch

    torch.set_num_threads(1)  # measured: 2 threads on 2 shared cores is 3-25x slower for this model
    s = Settings(**job["settings"])
    plan, method, n = job["plan"], BY_NAME[job["method"]], len(job["plan"]["volunteers"])
    method = replace(method, server_lr=job.get("server_lr", method.server_lr), lr=job.get("lr", method.lr))
    from loracommons.protocol.task import LoraSettings

    lora = LoraSettings(r=DEMO.lora_r, alpha=2.0 * DEMO.lora_r, target_modules=tuple(TARGETS))
    evaluate = Evaluator(lora, plan["heldout"])
    work = Path(job["work"])
    if method.kind == "centralized":
        participants, steps = [plan["pooled"]], n * s.steps
    elif method.kind == "pooled-same-time":
        participants, steps = [plan["pooled"]], s.steps
    elif method.kind == "local":
        participants, steps = [plan["volunteers"][job["volunteer"]]], s.steps
    else:
        participants, steps = plan["volunteers"], s.steps
    label = f"N={n} {method.name}" + (f" eta={method.server_lr:g}" if method.server_lr != 1 else "")
    label += (f" {participants[0]['name']}" if method.kind == "local" else "")
    label += f" lr {s.lr_schedule}" if s.lr_schedule != "constant" else ""
    result = federate(method, participants, steps, s, evaluate, work, label, _stderr)
    if job.get("base"):
        result["base"] = evaluate(_initial(lora, s), em=True)
    return result


def _initial(lora, s: Settings) -> dict:  # noqa: ANN001
    """The version-0 adapter (B = 0): scores the base model itself."""
    from loracommons.coordinator.initial import build_initial_adapter

    return build_initial_adapter(project_config(BY_NAME["ffa"], s.steps, 1, s))


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _run_jobs(jobs: list[dict], workers: int) -> list[dict]:
    if workers <= 1:
        return [run_job(job) for job in jobs]
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        return list(pool.map(run_job, jobs))


# ---------------------------------------------------------------- summary


def summarize(n: int, runs: dict[str, dict], local: list[dict], plan: dict) -> dict:
    skills = plan["skills"]
    final = {name: run["rounds"][-1] for name, run in runs.items()}
    table = {
        name: {
            "mean_heldout_loss": row["mean_heldout_loss"],
            "mean_exact_match": row["mean_exact_match"],
            "per_skill": row["per_skill"],
        }
        for name, row in final.items()
    }
    locals_ = {}
    for run, volunteer in zip(local, plan["volunteers"], strict=True):
        row = run["rounds"][-1]
        own = [row["per_skill"][k]["exact_match"] for k in volunteer["skills"]]
        locals_[volunteer["name"]] = {
            "skills": volunteer["skills"],
            "mean_heldout_loss": row["mean_heldout_loss"],
            "mean_exact_match": row["mean_exact_match"],
            "own_skill_exact_match": round(float(np.mean(own)), 4),
            "per_skill": row["per_skill"],
        }
    best_local = max(v["mean_exact_match"] for v in locals_.values())
    central = min(table[k]["mean_heldout_loss"] for k in ("centralized-ffa", "centralized-full")
                  if k in table)
    checks = {}
    fedavg = table.get("fedavg", {"mean_heldout_loss": None, "mean_exact_match": None})
    for mode in ("ffa", "exact"):
        if mode not in table:  # a run of some methods only (--methods)
            continue
        loss, em = table[mode]["mean_heldout_loss"], table[mode]["mean_exact_match"]
        gap = (loss - central) / central
        checks[mode] = {
            "heldout_loss": loss,
            "centralized_best_loss": central,
            "gap_to_centralized": round(gap, 4),
            "within_10pct_of_centralized": gap <= 0.10,
            "mean_exact_match": em,
            "best_local_mean_exact_match": best_local,
            "above_every_local_on_mean_exact_match": em > best_local,
            "fedavg_heldout_loss": fedavg["mean_heldout_loss"],
            "fedavg_mean_exact_match": fedavg["mean_exact_match"],
            "not_worse_than_fedavg": None if fedavg["mean_heldout_loss"] is None  # not run
            else loss <= fedavg["mean_heldout_loss"],
            "pooled_same_time_heldout_loss": table["pooled-same-time"]["mean_heldout_loss"],
            "loss_ratio_equal_sequential_steps": round(
                loss / table["pooled-same-time"]["mean_heldout_loss"], 4),
            "loss_ratio_equal_total_compute": round(loss / central, 4),
        }
        checks[mode]["equal_sequential_steps_met"] = (
            loss <= TARGET_RATIOS["equal_sequential_steps"] * table["pooled-same-time"]["mean_heldout_loss"])
        checks[mode]["equal_total_compute_met"] = loss <= TARGET_RATIOS["equal_total_compute"] * central
        checks[mode]["all_met"] = all(
            checks[mode][k] is not False
            for k in (
                "equal_sequential_steps_met",
                "equal_total_compute_met",
                "above_every_local_on_mean_exact_match",
                "not_worse_than_fedavg",
            )
        )
    curves = {
        name: {
            "heldout_loss": [r["mean_heldout_loss"] for r in run["rounds"]],
            "exact_match": [r.get("mean_exact_match") for r in run["rounds"]],
        }
        for name, run in runs.items()
    }
    curves["local-only (mean)"] = {
        key: [
            None
            if any(run["rounds"][i].get(field) is None for run in local)
            else round(float(np.mean([run["rounds"][i][field] for run in local])), 5)
            for i in range(len(local[0]["rounds"]))
        ]
        for key, field in (("heldout_loss", "mean_heldout_loss"), ("exact_match", "mean_exact_match"))
    }
    return {
        "volunteers": n,
        "skills": skills,
        "plan": [{k: v[k] for k in ("name", "skills", "examples")} for v in plan["volunteers"]],
        "final": table,
        "local_only": locals_,
        "curves": curves,
        "checks": checks,
        "target_met": any(c["all_met"] for c in checks.values()),
    }


def exactness_summary(results: dict) -> dict:
    out = {}
    for n, res in results.items():
        for name, run in res["runs"].items():
            rows = [r["exactness"] for r in run["rounds"] if "exactness" in r]
            if rows:
                out.setdefault(name, {})[n] = {
                    "per_round_rel_frobenius_error": [round(r["rel_frobenius_error"], 8) for r in rows],
                    "max_rel_frobenius_error": max(r["rel_frobenius_error"] for r in rows),
                    "max_module_rel_error": max(r["max_module_rel_error"] for r in rows),
                    "per_round_best_rank_r_rel_error": [round(r["best_rank_r_rel_error"], 8) for r in rows],
                }
    return out


def run(volunteer_counts: list[int], s: Settings, workers: int, bf16_counts: list[int], work: Path,
        methods: tuple[str, ...] = tuple(BY_NAME)) -> dict:
    started = time.monotonic()
    jobs, plans = [], {}
    for n in volunteer_counts:
        plans[n] = benchlib.skill_data(work / f"n{n}" / "data", n, s.n_train, s.n_heldout, s.seed)
        for method in METHODS:
            if method.name not in methods or method.name == "ffa-bf16" and n not in bf16_counts:
                continue
            common = {
                "settings": asdict(s),
                "plan": plans[n],
                "method": method.name,
                "work": str(work / f"n{n}"),
                "base": method.name == "ffa",
            }
            if method.kind == "local":
                jobs += [{**common, "volunteer": i} for i in range(n)]
            else:
                jobs.append(common)
    done = _run_jobs(jobs, workers)
    results = {}
    for n in volunteer_counts:
        mine = [
            (job, res) for job, res in zip(jobs, done, strict=True) if len(job["plan"]["volunteers"]) == n
        ]
        runs = {job["method"]: res for job, res in mine if BY_NAME[job["method"]].kind != "local"}
        local = [res for job, res in mine if BY_NAME[job["method"]].kind == "local"]
        base = runs["ffa"].pop("base")
        results[str(n)] = {
            "base": base,
            "runs": runs,
            "local_runs": local,
            "summary": summarize(n, runs, local, plans[n]),
        }
    return {
        "bench": "quality",
        "date": benchlib.now(),
        "machine": benchlib.machine_info(),
        "driver": "in-process: volunteers are loracommons.client.volunteer.Volunteer (real data loading, "
        "project trainer, signed envelopes); the coordinator side is coordinator.round.Round "
        "(admission, examples cap, aggregation, robust rules); Flower transport and the state store "
        "are not involved",
        "config": {
            **asdict(s),
            "volunteer_counts": volunteer_counts,
            "bf16_run_for": bf16_counts,
            "batch_size": DEMO.batch_size,
            "seq_len": SEQ_LEN,
            "warmup_steps": WARMUP_STEPS,
            "lora_r": DEMO.lora_r,
            "lora_alpha": 2.0 * DEMO.lora_r,
            "target_modules": list(TARGETS),
            "learning_rates": {m.name: m.lr for m in METHODS},
            "target_ratios": TARGET_RATIOS,
            "torch_threads": 1,
            "workers": workers,
            "centralized_steps_per_round": "volunteers x steps",
            "schedule": "AdamW state and warmup carried across rounds (keep_optimizer), each round a cosine "
            "from the peak to a tenth" if s.keep_optimizer else
            "every round: AdamW from fresh state, warmup then cosine (the volunteer trainer)",
            "methods": list(methods),
        },
        "results": results,
        "exactness": exactness_summary(results),
        "targets": {
            n: res["summary"]["checks"] | {"met": res["summary"]["target_met"]} for n, res in results.items()
        },
        "seconds": round(time.monotonic() - started, 1),
    }


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = list(report["results"])
    fig, axes = plt.subplots(len(counts), 2, figsize=(12, 4.2 * len(counts)), squeeze=False)
    styles = {
        "centralized-ffa": "k--",
        "centralized-full": "k:",
        "pooled-same-time": "C5--",
        "local-only (mean)": "C7-.",
        "ffa": "C0-o",
        "exact": "C1-s",
        "fedavg": "C3-^",
        "ffa-bf16": "C2-x",
    }
    for row, n in enumerate(counts):
        res = report["results"][n]
        base = res["base"]
        for name, curve in res["summary"]["curves"].items():
            rounds = list(range(0, len(curve["heldout_loss"]) + 1))
            loss = [base["mean_heldout_loss"], *curve["heldout_loss"]]
            axes[row][0].plot(rounds, loss, styles.get(name, "-"), label=name, markersize=4)
            em = [
                (r, v * 100)
                for r, v in zip(rounds, [base["mean_exact_match"], *curve["exact_match"]], strict=True)
                if v is not None
            ]
            axes[row][1].plot(
                [r for r, _ in em], [v for _, v in em], styles.get(name, "-"), label=name, markersize=4
            )
        axes[row][0].set_title(f"{n} volunteers: mean held-out loss per skill")
        axes[row][1].set_title(f"{n} volunteers: mean exact match (%) over skills")
        for ax in axes[row]:
            ax.set_xlabel("round")
            ax.grid(alpha=0.3)
        axes[row][0].set_yscale("log")
    axes[0][1].legend(fontsize=8)
    fig.suptitle("LoRA Commons quality: federated vs centralized (pooled) vs local-only, demo base, non-IID")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volunteers", default="3,6", help="comma-separated community sizes")
    d = Settings()
    parser.add_argument("--rounds", type=int, default=d.rounds, help="rounds (default: the demo's)")
    parser.add_argument(
        "--steps", type=int, default=d.steps, help="steps per volunteer per round (the demo's)"
    )
    parser.add_argument("--train", type=int, default=d.n_train, help="training examples per volunteer")
    parser.add_argument("--heldout", type=int, default=d.n_heldout, help="held-out examples per skill")
    parser.add_argument("--bf16-for", default="3", help="community sizes that also get an ffa-bf16 run")
    parser.add_argument(
        "--em-every", type=int, default=2, help="exact match every k rounds (0: the last only)"
    )
    parser.add_argument("--workers", type=int, default=1, help="processes running methods in parallel")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(BY_NAME),
                        help="comma-separated methods to run (needs centralized-ffa or -full, "
                        "pooled-same-time, local-only and ffa or exact)")
    parser.add_argument("--fresh-optimizer", action="store_true",
                        help="[train] keep_optimizer = false: AdamW and warmup restart every round")
    parser.add_argument("--tiny", action="store_true", help="2 volunteers, 2 rounds of 3 steps: a smoke test")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--plot", type=Path, default=None, help="PNG (default: next to --out)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.volunteers, args.rounds, args.steps, args.train, args.heldout = "2", 2, 3, 32, 6
        args.bf16_for, args.em_every = "2", 0
    counts = [int(x) for x in args.volunteers.split(",") if x]
    if not counts or min(counts) < 2 or args.rounds < 1 or args.steps < 1:
        parser.error("need --volunteers >= 2, --rounds >= 1 and --steps >= 1")
    s = Settings(
        rounds=args.rounds,
        steps=args.steps,
        n_train=args.train,
        n_heldout=args.heldout,
        seed=args.seed,
        em_every=args.em_every,
        keep_optimizer=not args.fresh_optimizer,
    )
    methods = tuple(m for m in args.methods.split(",") if m)
    unknown = sorted(set(methods) - set(BY_NAME))
    if unknown:
        parser.error(f"unknown method {unknown[0]!r} (known: {', '.join(BY_NAME)})")
    with tempfile.TemporaryDirectory(prefix="lc-quality-") as work:
        report = run(counts, s, args.workers, [int(x) for x in args.bf16_for.split(",") if x], Path(work),
                     methods)
    benchlib.write_json(args.out, report)
    png = plot(report, args.plot or args.out.with_name("quality_curves.png"))
    for n, res in report["results"].items():
        for name, row in res["summary"]["final"].items():
            _stderr(
                f"N={n} {name:>16}: held-out loss {row['mean_heldout_loss']:.3f}, "
                f"exact match {row['mean_exact_match']:.0%}"
            )
        _stderr(f"N={n} target met: {res['summary']['target_met']}")
    print(f"{args.out} {png} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
