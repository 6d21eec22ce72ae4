"""Coordinator round throughput and memory: admission + aggregation of N signed updates.

Simulates one round of N volunteers on a realistic adapter: rank 16 on q_proj and
v_proj of a 1B Llama (Llama-3.2-1B shapes: 16 layers, hidden 2048, GQA with 8 KV heads
of 64, so q_proj is 2048 -> 2048 and v_proj 2048 -> 512). Updates are generated and
signed one at a time and dropped after they are offered, so the bench never holds N
updates: what it measures is the coordinator's own memory. For each mode and N it
reports admission+aggregation MB/s over the payload bytes, next to hashlib.sha256 MB/s
on the same bytes in the same run, and the peak memory traced (tracemalloc, numpy
included) above the round's starting point.

    python bench/aggregate_bench.py                                  # N = 10, 50, 200; ffa and exact
    python bench/aggregate_bench.py --model tiny --sizes 3,6 --out /tmp/aggregate.json
    python bench/aggregate_bench.py --modes ffa,ffa+clip,ffa+clip+spill   # the buffering paths
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import os
import platform
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from loracommons.coordinator.admission import admit, context_for, expected_for
from loracommons.coordinator.aggregation import RoundAggregator
from loracommons.coordinator.config import ProjectConfig
from loracommons.protocol import modes
from loracommons.protocol.codec import encode_tensors
from loracommons.protocol.envelope import sha256_hex, sign_update
from loracommons.protocol.identity import SigningKey

DEFAULT_OUT = Path("bench/results/aggregate.json")
MODELS = {
    # layers, hidden, q out, v out (GQA), rank
    "1b": {
        "layers": 16,
        "hidden": 2048,
        "q_out": 2048,
        "v_out": 512,
        "r": 16,
        "name": "Llama-3.2-1B shapes (q_proj 2048x2048, v_proj 512x2048, 16 layers), r=16",
    },
    "tiny": {"layers": 2, "hidden": 64, "q_out": 64, "v_out": 32, "r": 4, "name": "tiny test shapes, r=4"},
}


def global_adapter(model: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(model["layers"]):
        for module, out_dim in (("q_proj", model["q_out"]), ("v_proj", model["v_out"])):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{module}"
            a = rng.standard_normal((model["r"], model["hidden"]), dtype=np.float32) / np.sqrt(
                model["hidden"]
            )
            out[f"{prefix}.lora_A.weight"] = a
            out[f"{prefix}.lora_B.weight"] = (
                rng.standard_normal((out_dim, model["r"]), dtype=np.float32) * 0.01
            )
    return out


def config_for(variant: str, model: dict, n: int) -> tuple[ProjectConfig, bool]:
    """`ffa`, `exact`, `fedavg`, optionally `+clip` (median clipping) and `+spill` (held updates on disk)."""
    mode, *extras = variant.split("+")
    base = ProjectConfig()
    agg = dataclasses.replace(base.aggregation, mode=mode, clip="median" if "clip" in extras else "none")
    rnd = dataclasses.replace(base.round, volunteers_per_round=n, min_volunteers=min(n, 3))
    lora = dataclasses.replace(base.lora, r=model["r"])
    return ProjectConfig(lora=lora, round=rnd, aggregation=agg), "spill" in extras


def simulated_updates(g: dict[str, np.ndarray], sent: list[str], n: int, seed: int):
    """N volunteers' (tensors, examples), one at a time: the global plus noise of std 0.01.

    Independent full-rank noise on every factor: a pessimistic case for `exact`'s sketch,
    which real updates (correlated, low-rank drift) are not.
    """
    rng = np.random.default_rng(seed + 1)
    for _ in range(n):  # no local name keeps an update alive while the consumer works on it
        noise = 0.01
        yield (
            {name: g[name] + rng.standard_normal(g[name].shape, dtype=np.float32) * noise for name in sent},
            int(rng.integers(50, 500)),
        )


def exact_error(g: dict[str, np.ndarray], result: dict[str, np.ndarray], n: int, seed: int) -> dict:
    """Measured error of `exact` on the first q_proj against a dense SVD of the same updates."""
    a_name = next(name for name in sorted(g) if "q_proj.lora_A" in name)
    b_name = a_name.replace(".lora_A.", ".lora_B.")
    total, weight = 0.0, 0
    for tensors, examples in simulated_updates(g, sorted(g), n, seed):
        total = total + examples * (tensors[b_name].astype(np.float64) @ tensors[a_name].astype(np.float64))
        weight += examples
    mean = total / weight
    u, s, vt = np.linalg.svd(mean, full_matrices=False)
    r = g[a_name].shape[0]
    best = (u[:, :r] * s[:r]) @ vt[:r]
    got = result[b_name].astype(np.float64) @ result[a_name].astype(np.float64)
    norm = np.linalg.norm(mean)
    return {
        "module": a_name.replace(".lora_A.weight", ""),
        "rel_err_vs_dense_mean": float(np.linalg.norm(got - mean) / norm),
        "best_rank_r_rel_err": float(np.linalg.norm(best - mean) / norm),
        "rel_dist_to_best_rank_r": float(np.linalg.norm(got - best) / norm),
    }


def run_one(variant: str, n: int, model: dict, seed: int = 0, check: bool = True) -> dict:
    """Two passes over the same updates: timed (tracemalloc off: it slows every allocation
    several-fold), then traced for the peak memory."""
    row = _run_one(variant, n, model, seed, check, traced=False)
    row["peak_mem_mb"] = _run_one(variant, n, model, seed, check=False, traced=True)["peak_mem_mb"]
    return row


def _run_one(variant: str, n: int, model: dict, seed: int, check: bool, traced: bool) -> dict:
    cfg, spill = config_for(variant, model, n)
    g = global_adapter(model, seed)
    digest = sha256_hex(encode_tensors(g))
    nonce = "5a" * 16
    task = cfg.task(1, nonce, digest)
    claims = {**task.claims(), "steps": 100, "train_loss": 1.0}
    expected = expected_for(cfg, 1, nonce, g, digest)
    admitted: set[str] = set()
    ctx = context_for(cfg, expected, g, admitted=admitted)
    sent = modes.get(cfg.aggregation.mode).sent_names(g)
    spill_dir = tempfile.TemporaryDirectory(prefix="aggbench-") if spill else None

    if traced:
        tracemalloc.start()
    base_mem = tracemalloc.get_traced_memory()[0]
    def envelopes():  # noqa: ANN202
        for tensors, examples in simulated_updates(g, sent, n, seed):
            yield sign_update(SigningKey.generate(), encode_tensors(tensors), examples=examples, **claims)

    # The timed pass has every envelope ready first, as replies waiting in the SuperLink would be:
    # nothing untimed runs between two offers (a fold on the helper thread could hide behind it).
    # The traced pass makes them one at a time, so that its peak is the coordinator's alone.
    updates = envelopes() if traced else list(envelopes())
    rnd = RoundAggregator(cfg, g, spill_dir=spill_dir.name if spill_dir else None)
    t_admit = t_fold = t_sha = 0.0
    total_bytes = 0
    for env in updates:
        total_bytes += len(env.payload)
        t0 = time.perf_counter()
        hashlib.sha256(env.payload).digest()
        t1 = time.perf_counter()
        verdict = admit(env, ctx)
        t2 = time.perf_counter()
        if not verdict.accepted:
            raise RuntimeError(f"bench update rejected: {verdict.reason}: {verdict.message}")
        admitted.add(verdict.signer)
        rnd.offer(verdict)
        t3 = time.perf_counter()
        del verdict, env
        t_sha, t_admit, t_fold = t_sha + t1 - t0, t_admit + t2 - t1, t_fold + t3 - t2
    t0 = time.perf_counter()
    outcome = rnd.finish()
    t_fold += time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] - base_mem
    if traced:
        tracemalloc.stop()
    if spill_dir:
        spill_dir.cleanup()
    if outcome.tensors is None:
        raise RuntimeError(f"round not aggregated: {outcome.message}")
    mb = total_bytes / 1e6
    row = {
        "variant": variant,
        "n": n,
        "payload_mb_total": round(mb, 3),
        "payload_mb_each": round(mb / n, 4),
        "admission_s": round(t_admit, 4),
        "aggregation_s": round(t_fold, 4),
        "admit_aggregate_mb_s": round(mb / (t_admit + t_fold), 2),
        "admission_mb_s": round(mb / t_admit, 2),
        "sha256_mb_s": round(mb / t_sha, 2),
        "peak_mem_mb": round(peak / 1e6, 2),
        "buffers_updates": rnd.buffers,
        "metrics": {k: round(float(v), 8) for k, v in outcome.metrics.items()},
    }
    if check and cfg.aggregation.mode == "exact" and cfg.aggregation.clip == "none":
        row["exact_check"] = exact_error(g, outcome.tensors, n, seed)  # after the timed, traced run
    return row


def run(
    sizes: list[int], variants: list[str], model_name: str, seed: int = 0, check: bool = True, log=print
) -> dict:
    model = MODELS[model_name]
    results = []
    for variant in variants:
        run_one(variant, 3, model, seed, check=False)  # warm-up: imports, BLAS and allocator caches
        for n in sizes:
            row = run_one(variant, n, model, seed, check)
            log(
                f"{variant:>16} N={n:<4} {row['admit_aggregate_mb_s']:>9.1f} MB/s "
                f"(sha256 {row['sha256_mb_s']:.0f} MB/s)  peak {row['peak_mem_mb']:.1f} MB"
            )
            results.append(row)
    flat = {}
    for variant in variants:
        rows = [r for r in results if r["variant"] == variant]
        first, last = min(rows, key=lambda r: r["n"]), max(rows, key=lambda r: r["n"])
        flat[variant] = round(last["peak_mem_mb"] / max(first["peak_mem_mb"], 1e-9), 3)
    return {
        "bench": "aggregate",
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model_name,
        "model_shapes": model["name"],
        "sizes": sizes,
        "variants": variants,
        "memory_ratio_largest_to_smallest_n": flat,
        "results": results,
        "notes": "peak_mem_mb: tracemalloc peak above the start of the round (numpy buffers included), "
        "while updates are generated one at a time, from a second pass over the same updates; "
        "timings (first pass, tracemalloc off) exclude generating and signing. "
        "exact_check: on one module, the exact result against a dense SVD of the same updates "
        "(computed after the timed run).",
        "machine": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "blas_threads": {k: v for k, v in os.environ.items() if k.endswith("_NUM_THREADS")},
            "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, 1),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10,50,200", help="comma-separated numbers of updates per round")
    parser.add_argument("--model", choices=sorted(MODELS), default="1b")
    parser.add_argument(
        "--modes",
        default="ffa,exact",
        help="comma-separated variants: ffa, exact, fedavg, each optionally +clip, +clip+spill",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-check", action="store_true", help="skip measuring exact's error against a dense SVD"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if not sizes or min(sizes) < 1:
        parser.error("--sizes needs positive integers")
    report = run(
        sizes,
        [m for m in args.modes.split(",") if m],
        args.model,
        args.seed,
        not args.no_check,
        log=lambda line: print(line, file=sys.stderr),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
