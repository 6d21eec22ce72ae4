"""Communication: bytes on the wire per volunteer per round, for each mode, payload and downlink dtype.

    down  the round task (canonical JSON) + the downlink header + the global adapter as the
          coordinator sends it (protocol/downlink.py): in `ffa` B only (A is regenerated from the
          project seed), in the downlink dtype, packed (lossless); `down_whole_bytes` is what was
          sent before the downlink diet (A and B, float32, raw)
    up    the update envelope: manifest + payload (the mode's tensors in the payload dtype) + signature;
          `up_wire` is what a volunteer actually sends: the payload packed for transport
          (protocol/wire.py: bytes regrouped by position in each number, zlib level 1; lossless,
          signed digest unchanged)

Sizes come from real encoded tasks, downlinks and signed envelopes, for the demo model (the
adapter the quality bench trains) and for Llama-3.2-1B shapes (all seven linear modules, and the
q_proj/v_proj-only setting common in FlowerTune/OpenFedLLM recipes). The baseline is the
common one: A and B in float32 (`fedavg`, float32), sent raw both ways as FlowerTune/OpenFedLLM
send them. The target (issue 14): an `ffa` round trip as sent <= 0.25 of the baseline's. Flower's
own message framing is not counted (the same for every mode).

How much packing saves depends on the values. The synthetic adapters here hold Gaussian
stand-ins (std 0.01; a fresh LoRA's zero B would pack to almost nothing) and every task is a
first one (no delta); the sizes of real trained rounds, deltas included, are in
`measured_in_quality_run` and `measured_downlink` (from downlink_quality.py).

With a quality report (`--quality`, from quality_bench.py) it also gives quality at equal
bytes: the held-out loss each federated run reaches against the bytes each volunteer sent.

    python bench/comm_bench.py --quality bench/results/quality.json \
        --downlink-quality bench/results/downlink_quality.json
    python bench/comm_bench.py --models demo --out /tmp/comm.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import benchlib
import numpy as np

DEFAULT_OUT = benchlib.RESULTS / "comm.json"
DTYPES = ("float32", "float16", "bfloat16")
DOWNLINK_DTYPES = ("float32", "bfloat16")
ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA_1B = {"layers": 16, "hidden": 2048, "kv": 512, "intermediate": 8192}
TARGET_RATIO = 0.25


def llama_shapes(dims: dict, modules: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """(out, in) of each targeted linear layer of a Llama decoder, PEFT-named."""
    h, kv, inter = dims["hidden"], dims["kv"], dims["intermediate"]
    io = {
        "q_proj": (h, h),
        "k_proj": (kv, h),
        "v_proj": (kv, h),
        "o_proj": (h, h),
        "gate_proj": (inter, h),
        "up_proj": (inter, h),
        "down_proj": (h, inter),
    }
    kind = {m: "self_attn" if m in ALL_MODULES[:4] else "mlp" for m in ALL_MODULES}
    return {
        f"base_model.model.model.layers.{i}.{kind[m]}.{m}": io[m]
        for i in range(dims["layers"])
        for m in modules
    }


def adapter_for(shapes: dict[str, tuple[int, int]], r: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for prefix, (d_out, d_in) in shapes.items():
        out[f"{prefix}.lora_A.weight"] = rng.standard_normal((r, d_in), dtype=np.float32) * 0.01
        out[f"{prefix}.lora_B.weight"] = rng.standard_normal((d_out, r), dtype=np.float32) * 0.01
    return out


def demo_adapter() -> tuple[dict[str, np.ndarray], object]:
    from quality_bench import BY_NAME, Settings, project_config

    from loracommons.coordinator.initial import build_initial_adapter

    cfg = project_config(BY_NAME["ffa"], 40, 3, Settings())
    rng = np.random.default_rng(0)
    tensors = {  # trained-like values: the initial B is all zeros
        name: (rng.standard_normal(value.shape, dtype=np.float32) * 0.01 if ".lora_B." in name else value)
        for name, value in build_initial_adapter(cfg).items()
    }
    return tensors, cfg


def wire_bytes(tensors: dict[str, np.ndarray], cfg, mode: str, dtype: str,  # noqa: ANN001
               downlink: str = "float32") -> dict:
    """Bytes of one round for one volunteer, from a real task, downlink and signed envelope."""
    import dataclasses

    from loracommons.coordinator.downlinks import regenerates
    from loracommons.protocol import modes, wire
    from loracommons.protocol.codec import DTYPES, canonical_digest, encode_tensors, round_tensors
    from loracommons.protocol.downlink import build
    from loracommons.protocol.envelope import sign_update
    from loracommons.protocol.identity import SigningKey

    cfg = dataclasses.replace(
        cfg,
        aggregation=dataclasses.replace(cfg.aggregation, mode=mode),
        round=dataclasses.replace(cfg.round, downlink_dtype=downlink),
        limits=dataclasses.replace(cfg.limits, payload_dtype=dtype),
    )
    update = tensors  # what a volunteer trained: not rounded to the downlink dtype
    tensors = round_tensors(tensors, downlink)  # the coordinator's global, as it holds it
    task = cfg.task(3, "ab" * 16, canonical_digest(tensors))
    link, sent = build(tensors, mode, downlink, regenerate=regenerates(mode))
    payload = encode_tensors({n: update[n] for n in modes.get(mode).sent_names(update)}, dtype=dtype)
    env = sign_update(
        SigningKey.generate(), payload, **task.claims(), examples=400, steps=40, train_loss=0.12345
    )
    task_json = len(task.to_bytes())
    down = {"task_json": task_json, "downlink_header": len(link.to_bytes()), "global_adapter": len(sent)}
    up = {"manifest": len(env.manifest), "payload": len(env.payload), "signature": len(env.signature)}
    encoding, packed = wire.pack(env.payload, DTYPES[dtype][1])
    return {
        "mode": mode,
        "dtype": dtype,
        "downlink_dtype": downlink,
        "downlink": {"tensors": link.tensors, "encoding": link.encoding},
        "down": down,
        "up": up,
        "down_whole_bytes": task_json + len(encode_tensors(tensors)),
        "down_wire_bytes": sum(down.values()),
        "up_bytes": sum(up.values()),
        "up_wire_bytes": sum(up.values()) - len(env.payload) + len(packed) + len(encoding),
        "encoding": encoding,
    }


def table(tensors: dict[str, np.ndarray], cfg) -> dict:  # noqa: ANN001
    from loracommons.protocol import modes

    rows = [wire_bytes(tensors, cfg, mode, dtype, downlink) for mode in modes.names() for dtype in DTYPES
            for downlink in DOWNLINK_DTYPES]
    base = next(r for r in rows
                if (r["mode"], r["dtype"], r["downlink_dtype"]) == ("fedavg", "float32", "float32"))
    base_trip = base["up_bytes"] + base["down_whole_bytes"]  # fp32 A+B raw, both ways
    for row in rows:
        row["up_ratio_to_fp32_ab"] = round(row["up_bytes"] / base["up_bytes"], 4)
        row["up_wire_ratio_to_fp32_ab"] = round(row["up_wire_bytes"] / base["up_bytes"], 4)
        row["down_wire_ratio_to_fp32_ab"] = round(row["down_wire_bytes"] / base["down_whole_bytes"], 4)
        trip = row["up_wire_bytes"] + row["down_wire_bytes"]
        row["round_trip_ratio_to_fp32_ab"] = round(trip / base_trip, 4)
        if row["mode"] == "ffa":
            row["round_trip_target_met"] = row["round_trip_ratio_to_fp32_ab"] <= TARGET_RATIO
    a = sum(v.size for k, v in tensors.items() if ".lora_A." in k)
    b = sum(v.size for k, v in tensors.items() if ".lora_B." in k)
    ffa_bf16 = next(r for r in rows if r["mode"] == "ffa" and r["dtype"] == "bfloat16"
                    and r["downlink_dtype"] == "bfloat16")
    return {
        "a_params": int(a),
        "b_params": int(b),
        "b_share": round(b / (a + b), 4),
        "rows": rows,
        "baseline": {
            "mode": "fedavg",
            "dtype": "float32",
            "up_bytes": base["up_bytes"],
            "down_bytes": base["down_whole_bytes"],
        },
        "ffa_round_trip": {f"{r['dtype']} up, {r['downlink_dtype']} down": r["round_trip_ratio_to_fp32_ab"]
                           for r in rows if r["mode"] == "ffa"},
        "ffa_bf16_up_ratio": ffa_bf16["up_ratio_to_fp32_ab"],
        "ffa_bf16_up_wire_ratio": ffa_bf16["up_wire_ratio_to_fp32_ab"],
        "ffa_bf16_round_trip_ratio": ffa_bf16["round_trip_ratio_to_fp32_ab"],
        "target_up_ratio_met": ffa_bf16["up_wire_ratio_to_fp32_ab"] <= TARGET_RATIO,
        "round_trip_target_met": ffa_bf16["round_trip_ratio_to_fp32_ab"] <= TARGET_RATIO,
    }


def equal_bytes(quality: dict) -> dict:
    """Held-out loss against cumulative bytes per volunteer, from the quality bench's federated runs."""
    out = {}
    for n, res in quality["results"].items():
        runs = {k: v for k, v in res["runs"].items() if k in ("ffa", "exact", "fedavg", "ffa-bf16")}
        if "ffa-bf16" not in runs or "fedavg" not in runs:
            continue
        curves = {}
        for name, run in runs.items():
            up = np.cumsum([r["bytes_up_per_volunteer"] for r in run["rounds"]]).tolist()
            total = np.cumsum(
                [r["bytes_up_per_volunteer"] + r["bytes_down_per_volunteer"] for r in run["rounds"]]
            ).tolist()
            curves[name] = {
                "cumulative_up_bytes": up,
                "cumulative_round_trip_bytes": total,
                "heldout_loss": [r["mean_heldout_loss"] for r in run["rounds"]],
                "payload_dtype": run["payload_dtype"],
            }
        budgets = []
        for k, budget in enumerate(curves["fedavg"]["cumulative_up_bytes"], start=1):
            row = {
                "fedavg_fp32_rounds": k,
                "up_bytes_budget": budget,
                "fedavg_fp32_loss": curves["fedavg"]["heldout_loss"][k - 1],
            }
            for name in ("ffa-bf16", "ffa", "exact"):
                # 0.1% slack: manifests differ by a few bytes between modes (the mode's name)
                fits = [i for i, b in enumerate(curves[name]["cumulative_up_bytes"]) if b <= budget * 1.001]
                row[f"{name}_rounds"] = len(fits)
                row[f"{name}_loss"] = curves[name]["heldout_loss"][fits[-1]] if fits else None
            budgets.append(row)
        last = {name: c["heldout_loss"][-1] for name, c in curves.items()}
        out[n] = {
            "curves": curves,
            "at_equal_upload_bytes": budgets,
            "final_loss_equal_rounds": last,
            "ffa_bf16_no_worse_than_fedavg_fp32": last["ffa-bf16"] <= last["fedavg"],
            "ffa_bf16_vs_ffa_fp32_loss_change": round(last["ffa-bf16"] / last["ffa"] - 1, 4),
        }
    return out


def measured(quality: dict) -> dict:
    """Bytes the quality bench's real envelopes had (demo model, trained updates): raw and as sent,
    against the fp32 A+B baseline (`fedavg` fp32, raw) of the same run."""
    out = {}
    for n, res in quality["results"].items():
        runs = {k: v["rounds"] for k, v in res["runs"].items() if k in ("ffa", "exact", "fedavg", "ffa-bf16")}
        if "fedavg" not in runs:
            continue
        base = np.mean([r["bytes_up_per_volunteer"] for r in runs["fedavg"]])
        for name, rounds in runs.items():
            raw = float(np.mean([r["bytes_up_per_volunteer"] for r in rounds]))
            row = {"up_bytes": int(raw), "down_bytes": rounds[-1]["bytes_down_per_volunteer"],
                   "up_ratio_to_fp32_ab": round(raw / base, 4)}
            if all("bytes_up_wire_per_volunteer" in r for r in rounds):  # older reports lack it
                wire_bytes = float(np.mean([r["bytes_up_wire_per_volunteer"] for r in rounds]))
                row["up_wire_bytes"] = int(wire_bytes)
                row["up_wire_ratio_to_fp32_ab"] = round(wire_bytes / base, 4)
            out.setdefault(n, {})[name] = row
        bf16 = out[n].get("ffa-bf16", {})
        if "up_wire_ratio_to_fp32_ab" in bf16:
            out[n]["ffa_bf16_target_up_ratio_met"] = bf16["up_wire_ratio_to_fp32_ab"] <= TARGET_RATIO
    return out


def measured_downlink(report: dict, baseline: dict) -> dict:
    """Round trips of the downlink quality run (demo model, trained rounds, deltas where smaller)
    against the demo adapter's fp32 A+B baseline both ways."""
    trip = baseline["up_bytes"] + baseline["down_bytes"]
    out = {}
    for name, b in report["bytes_per_volunteer_per_round"].items():
        run = report["runs"][name]
        ratio = round((b["down_wire_mean"] + b["up_wire_mean"]) / trip, 4)
        out[name] = {**b, "payload_dtype": run["payload_dtype"], "downlink_dtype": run["downlink_dtype"],
                     "round_trip_ratio_to_fp32_ab": ratio, "round_trip_target_met": ratio <= TARGET_RATIO,
                     "final_heldout_loss": report["final_heldout_loss"][name]}
    return {"volunteers": report["config"]["volunteers"], "rounds": report["config"]["rounds"],
            "runs": out, "bf16_downlink_no_worse_than_ffa": report["bf16_downlink_no_worse_than_ffa"]}


def run(models: list[str], quality_path: Path | None, downlink_path: Path | None = None) -> dict:
    from loracommons.coordinator.config import ProjectConfig
    from loracommons.protocol.task import LoraSettings

    results = {}
    if "demo" in models:
        tensors, cfg = demo_adapter()
        results["demo"] = {
            "description": "embedded demo model (805k-param Llama), r=16, all 7 linear modules",
            **table(tensors, cfg),
        }
    for name, modules in (("llama-3.2-1b-all", ALL_MODULES), ("llama-3.2-1b-qv", ("q_proj", "v_proj"))):
        if name in models:
            cfg = ProjectConfig(lora=LoraSettings(r=16, alpha=32.0, target_modules=modules))
            tensors = adapter_for(llama_shapes(LLAMA_1B, modules), 16)
            results[name] = {
                "description": f"Llama-3.2-1B shapes, r=16, {', '.join(modules)}",
                **table(tensors, cfg),
            }
    report = {
        "bench": "comm",
        "date": benchlib.now(),
        "machine": benchlib.machine_info(),
        "unit": "bytes per volunteer per round",
        "target_up_ratio": TARGET_RATIO,
        "models": results,
    }
    if quality_path is not None and quality_path.exists():
        quality = json.loads(quality_path.read_text())
        report["measured_in_quality_run"] = measured(quality)
        report["quality_at_equal_bytes"] = equal_bytes(quality)
    if downlink_path is not None and downlink_path.exists() and "demo" in results:
        report["measured_downlink"] = measured_downlink(json.loads(downlink_path.read_text()),
                                                        results["demo"]["baseline"])
    return report


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(report["models"])
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(5.2 * (len(models) + 1), 4.5))
    for ax, name in zip(axes, models, strict=False):
        rows = report["models"][name]["rows"]
        short = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
        labels = [f"{r['mode']}\n{short[r['dtype']]}/{short[r['downlink_dtype']]}" for r in rows]
        x = np.arange(len(rows))
        ax.bar(x - 0.27, [r["up_ratio_to_fp32_ab"] for r in rows], 0.27, label="up (update)")
        ax.bar(x, [r["up_wire_ratio_to_fp32_ab"] for r in rows], 0.27, label="up, packed for the wire")
        ax.bar(x + 0.27, [r["round_trip_ratio_to_fp32_ab"] for r in rows], 0.27, label="round trip as sent")
        ax.axhline(TARGET_RATIO, color="k", ls="--", lw=1, label="target 0.25")
        ax.set_xticks(x, labels, fontsize=5)
        ax.set_title(f"{name}: bytes / fp32 A+B baseline (up/down dtype)", fontsize=9)
        ax.set_ylim(0, 1.1)
    axes[0].legend(fontsize=8)
    ax = axes[-1]
    eq = report.get("quality_at_equal_bytes", {})
    for n, res in eq.items():
        for name, curve in res["curves"].items():
            ax.plot(
                np.array(curve["cumulative_up_bytes"]) / 1e6,
                curve["heldout_loss"],
                "-o",
                markersize=3,
                label=f"N={n} {name}",
            )
    ax.set_xlabel("cumulative MB sent per volunteer")
    ax.set_ylabel("mean held-out loss")
    ax.set_title("quality at equal bytes (quality bench)", fontsize=9)
    if eq:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        default="demo,llama-3.2-1b-all,llama-3.2-1b-qv",
        help="comma-separated: demo, llama-3.2-1b-all, llama-3.2-1b-qv",
    )
    parser.add_argument("--quality", type=Path, default=None, help="quality.json for quality at equal bytes")
    parser.add_argument("--downlink-quality", type=Path, default=None,
                        help="downlink_quality.json: measured round trips of trained rounds (demo)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--plot", type=Path, default=None, help="PNG (default: comm_bars.png next to --out)")
    args = parser.parse_args(argv)
    report = run([m for m in args.models.split(",") if m], args.quality, args.downlink_quality)
    benchlib.write_json(args.out, report)
    png = plot(report, args.plot or args.out.with_name("comm_bars.png"))
    for name, res in report["models"].items():
        print(
            f"{name}: ffa bf16 up ratio {res['ffa_bf16_up_ratio']:.3f} "
            f"(packed {res['ffa_bf16_up_wire_ratio']:.3f}); ffa round trip as sent: "
            + ", ".join(f"{k} {v:.3f}" for k, v in res["ffa_round_trip"].items()),
            file=sys.stderr,
        )
    print(f"{args.out} {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
