"""Round overhead on real processes: LoRA Commons against a plain-Flower FedAvg app, same bytes.

Both runs use real processes on 127.0.0.1: one SuperLink and two SuperNodes.

    LoRA Commons   `loracommons coordinator start` (SuperLink + the round loop) and two
                   `loracommons join` volunteers on the demo model, ffa, a few training steps
    plain Flower   stock `flower-superlink`, two stock `flower-supernode`s and `flwr run` of
                   bench/plain_flower_app: flwr.serverapp.strategy.FedAvg, a ClientApp that
                   replies at once with an array as large as LoRA Commons' update payload, the
                   server sending arrays as large as LoRA Commons' global adapter

Per round: wall time from one round's start to the next (the last: to the end of the
loop) minus the volunteers' training time (the longest `seconds` of the `update sent`
lines of the round's volunteers; plain Flower trains nothing). Round 1 includes loading
the model (LoRA Commons) or starting the ClientApp processes (Flower) and is reported
apart; the ratio compares the mean overhead of rounds 2..R.

Each LoRA Commons round is also split into its parts (dispatch, volunteer, reply, close,
next: bench/overhead_breakdown.py), and every process line is kept with its arrival time
in the work folder's logs/timeline.tsv.

    python bench/overhead_bench.py                    # 4 rounds each, about 2 minutes
    python bench/overhead_bench.py --rounds 1 --out /tmp/overhead.json
    python bench/overhead_bench.py --no-flower --out /tmp/lc.json   # LoRA Commons alone, ~1 minute
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import benchlib
from overhead_breakdown import breakdown

from loracommons.client.node import free_port
from loracommons.protocol import processes

DEFAULT_OUT = benchlib.RESULTS / "overhead.json"
PLAIN_APP = Path(__file__).resolve().parent / "plain_flower_app"
BIN = Path(sys.executable).parent
SENT = re.compile(r"round (\d+): update sent \(.*, ([\d.]+) s\)\s*$")
EVENT = re.compile(r"^\d\d:\d\d:\d\d (\w+) (.*)$")


class BenchError(RuntimeError):
    pass


@dataclass
class Procs:
    """Processes this bench started, each in its own session; lines timestamped as they arrive."""

    logs: Path
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    lines: list[tuple[float, str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, name: str, args: list[str], env: dict) -> subprocess.Popen:
        proc = processes.start(args, env={**os.environ, "PYTHONUNBUFFERED": "1", **env})
        self.procs.append((name, proc))
        threading.Thread(target=self._read, args=(name, proc), daemon=True).start()
        return proc

    def _read(self, name: str, proc: subprocess.Popen) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "a") as log:
            for line in proc.stdout:
                stamp = time.monotonic()
                log.write(line)
                with self.lock:
                    self.lines.append((stamp, name, line.rstrip("\n")))

    def save_timeline(self) -> None:
        """Every line with its arrival time (CLOCK_MONOTONIC, comparable across processes)."""
        with self.lock, open(self.logs / "timeline.tsv", "w") as fh:
            fh.writelines(f"{stamp:.3f}\t{name}\t{line}\n" for stamp, name, line in self.lines)

    def record(self) -> list[dict]:
        return [{"name": name, "pid": proc.pid, "exit_code": proc.returncode} for name, proc in self.procs]

    def of(self, name: str) -> list[tuple[float, str]]:
        with self.lock:
            return [(t, line) for t, n, line in self.lines if n == name]

    def stop(self) -> None:
        """SIGTERM each process by pid, then SIGKILL what is left of its group (superexec, apps)."""
        processes.stop_all([proc for _, proc in self.procs], timeout=20)


def wait_for(predicate, timeout: float, what: str, procs: Procs) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for name, proc in procs.procs:
            if proc.poll() is not None and proc.returncode != 0:
                tail = "\n".join(line for _, line in procs.of(name)[-15:])
                raise BenchError(
                    f"{name} exited with code {proc.returncode} while waiting for {what}:\n{tail}"
                )
        time.sleep(0.1)
    tails = {name: [line for _, line in procs.of(name)[-5:]] for name, _ in procs.procs}
    raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}; last lines: {tails}")


# ---------------------------------------------------------------- LoRA Commons


def adapter_sizes() -> dict:
    """Float counts of A and B and the byte sizes of the demo project's global adapter and ffa payload."""
    from loracommons.coordinator.config import ProjectConfig
    from loracommons.coordinator.initial import build_initial_adapter
    from loracommons.protocol import modes
    from loracommons.protocol.codec import encode_tensors
    from loracommons.protocol.lora import DEMO_MODEL_ID

    cfg = ProjectConfig.from_dict(
        project_overrides(1, 1) | {"project": {"base_model": DEMO_MODEL_ID}}
    )
    tensors = build_initial_adapter(cfg)
    a = sum(v.size for k, v in tensors.items() if ".lora_A." in k)
    b = sum(v.size for k, v in tensors.items() if ".lora_B." in k)
    payload = encode_tensors({k: tensors[k] for k in modes.get("ffa").sent_names(tensors)})
    return {
        "a_floats": int(a),
        "b_floats": int(b),
        "global_adapter_bytes": len(encode_tensors(tensors)),
        "ffa_payload_bytes": len(payload),
    }


def project_overrides(rounds: int, steps: int) -> dict:
    from loracommons.demo.community import TARGETS, DemoSettings

    demo = DemoSettings()
    return {
        "lora": {"r": demo.lora_r, "alpha": float(2 * demo.lora_r), "target_modules": list(TARGETS)},
        "train": {
            "max_steps": steps,
            "batch_size": demo.batch_size,
            "seq_len": 64,
            "learning_rate": demo.learning_rate,
            "warmup_steps": 1,
            "max_minutes": 5.0,
        },
        "round": {"rounds": rounds, "volunteers_per_round": 2, "min_volunteers": 2, "timeout_s": 300.0},
        # plain streaming, as the Flower baseline aggregates (an open project's init adds median clipping)
        "aggregation": {"clip": "none"},
    }


def run_loracommons(work: Path, rounds: int, steps: int, timeout: float, log) -> dict:  # noqa: ANN001
    from loracommons.coordinator.config import init_project
    from loracommons.demo.skills import make_examples
    from loracommons.protocol.lora import DEMO_MODEL_ID

    project = work / "project"
    init_project(
        project,
        DEMO_MODEL_ID,
        name="overhead bench",
        mode="ffa",
        **project_overrides(rounds, steps),
    )
    datas = [
        benchlib.write_jsonl(work / f"volunteer-{i}.jsonl", make_examples(skill, 64, i, "train"))
        for i, skill in enumerate(("reverse", "sort"))
    ]
    port, http_port = free_port(), free_port()
    lc = [sys.executable, "-m", "loracommons"]
    procs = Procs(work / "logs")
    started = time.monotonic()
    try:
        coordinator = procs.start(
            "coordinator",
            [
                *lc,
                "coordinator",
                "start",
                str(project),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--http-host",
                "127.0.0.1",
                "--http-port",
                str(http_port),
                "--insecure",
                "--plain",
            ],
            {},
        )
        wait_for(
            lambda: any("coordinator ready" in line for _, line in procs.of("coordinator")),
            120,
            "the coordinator",
            procs,
        )
        for i, data in enumerate(datas):
            procs.start(
                f"volunteer-{i}",
                [
                    *lc,
                    "join",
                    f"127.0.0.1:{port}",
                    "--data",
                    str(data),
                    "--identity",
                    str(work / "identities" / f"volunteer-{i}"),
                    "--insecure",
                    "--threads",
                    "1",
                ],
                {"FLWR_HOME": str(work / "flwr" / f"volunteer-{i}")},
            )
        wait_for(lambda: coordinator.poll() is not None, timeout, "the coordinator's last round", procs)
        total = time.monotonic() - started
    finally:
        procs.stop()
        procs.save_timeline()
    if coordinator.returncode != 0:
        raise BenchError(f"coordinator exited with {coordinator.returncode}; see {procs.logs}")
    events = []
    for stamp, line in procs.of("coordinator"):
        match = EVENT.match(line)
        if match:
            details = dict(kv.split("=", 1) for kv in match.group(2).split() if "=" in kv)
            events.append((stamp, match.group(1), details))
    opens = {int(d["round"]): t for t, e, d in events if e == "round_open"}
    closed = {int(d["round"]): d.get("status") for t, e, d in events if e == "round_closed"}
    closed_at = {int(d["round"]): t for t, e, d in events if e == "round_closed"}
    finished = [t for t, e, _ in events if e == "finished"]
    if sorted(opens) != list(range(1, rounds + 1)) or not finished:
        raise BenchError(f"coordinator ran rounds {sorted(opens)} of {rounds}; see {procs.logs}")
    if any(status != "aggregated" for status in closed.values()):
        raise BenchError(f"not every round was aggregated: {closed}; see {procs.logs}")
    training: dict[int, list[float]] = {}
    for i in range(len(datas)):
        for _, line in procs.of(f"volunteer-{i}"):
            match = SENT.search(line)
            if match:
                training.setdefault(int(match.group(1)), []).append(float(match.group(2)))
    ends = [opens.get(r + 1, finished[0]) for r in range(1, rounds + 1)]
    parts = {row.pop("round"): row for row in breakdown(
        procs.of("coordinator"), [procs.of(f"volunteer-{i}") for i in range(len(datas))], rounds)}
    per_round = []
    for r, end in zip(range(1, rounds + 1), ends, strict=True):
        wall = end - opens[r]
        train = max(training.get(r, [0.0]))
        per_round.append(
            {
                "round": r,
                "wall_s": round(wall, 3),
                "volunteer_training_s": train,
                "volunteers_reporting": len(training.get(r, [])),
                "open_to_closed_s": round(closed_at[r] - opens[r], 3),
                "overhead_s": round(wall - train, 3),
                "parts": parts.get(r, {}),
            }
        )
        log(
            f"LoRA Commons round {r}: wall {wall:.2f} s, training {train:.1f} s, overhead "
            f"{wall - train:.2f} s; " + ", ".join(f"{k} {v}" for k, v in parts.get(r, {}).items())
        )
    return {
        "rounds": per_round,
        "steps_per_round": steps,
        "total_s": round(total, 2),
        "processes": procs.record(),
        "commands": [
            "loracommons coordinator start PROJECT --insecure --plain",
            "loracommons join 127.0.0.1:PORT --data FILE --insecure --threads 1  (x2)",
        ],
    }


# ---------------------------------------------------------------- plain Flower


def run_plain_flower(work: Path, rounds: int, sizes: dict, timeout: float, log) -> dict:  # noqa: ANN001
    home = work / "flwr-home"
    home.mkdir(parents=True)
    env = {"FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    port = free_port()
    procs = Procs(work / "logs")
    out_file = work / "plain-report.json"
    started = time.monotonic()
    try:
        procs.start(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--database",
                ":flwr-in-memory:",  # as the coordinator runs its own
                "--disable-runtime-dependency-installation",
            ],
            env,
        )
        wait_for(lambda: _port_open(port), 60, "the SuperLink", procs)
        for i in range(2):
            procs.start(
                f"supernode-{i}",
                [
                    str(BIN / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{port}",
                    "--port",
                    str(free_port()),
                    "--node-config",
                    f"partition-id={i}",
                ],
                env,
            )
        subprocess.run(
            [str(BIN / "flwr"), "config", "list"],
            env={**os.environ, **env},
            capture_output=True,
            check=True,
            timeout=60,
        )
        with open(home / "config.toml", "a") as fh:
            fh.write(f'\n[superlink.bench]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
        run_config = (
            f"num-rounds={rounds} a-floats={sizes['a_floats']} b-floats={sizes['b_floats']} "
            f'out-file="{out_file}"'
        )
        flwr = procs.start(
            "flwr-run",
            [str(BIN / "flwr"), "run", str(PLAIN_APP), "bench", "--run-config", run_config, "--stream"],
            env,
        )
        wait_for(out_file.exists, timeout, "the plain Flower run", procs)
        total = time.monotonic() - started
        del flwr
    finally:
        procs.stop()
    import json

    report = json.loads(out_file.read_text())
    starts = {int(k): v for k, v in report["round_starts"].items()}
    per_round = []
    for r in range(1, rounds + 1):
        wall = starts.get(r + 1, report["finished"]) - starts[r]
        per_round.append(
            {"round": r, "wall_s": round(wall, 3), "volunteer_training_s": 0.0, "overhead_s": round(wall, 3)}
        )
        log(f"plain Flower round {r}: wall {wall:.2f} s (no training)")
    return {
        "rounds": per_round,
        "total_s": round(total, 2),
        "processes": procs.record(),
        "commands": [
            "flower-superlink --insecure",
            "flower-supernode --insecure (x2)",
            "flwr run bench/plain_flower_app bench --stream",
        ],
    }


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# ---------------------------------------------------------------- report


def summary(rows: list[dict]) -> dict:
    steady = rows[1:] or rows
    mean = sum(r["overhead_s"] for r in steady) / len(steady)
    out = {
        "first_round_overhead_s": rows[0]["overhead_s"],
        "steady_rounds": [r["round"] for r in steady],
        "mean_overhead_s": round(mean, 3),
        "mean_wall_s": round(sum(r["wall_s"] for r in steady) / len(steady), 3),
    }
    parts = [r["parts"] for r in steady if r.get("parts")]
    if parts:
        out["mean_parts_s"] = {
            key: round(sum(values) / len(values), 3)
            for key in parts[0]
            if (values := [p[key] for p in parts if p.get(key) is not None])
        }
    return out


TARGET_RATIO = 0.15
"""Issue 12 ("cheap rounds"): steady overhead at most this fraction of plain Flower's..."""
TARGET_OVERHEAD_S = 0.5
"""...and at most this many seconds per round beyond the volunteers' training."""


def run(rounds: int, steps: int, timeout: float, log, work_dir: Path | None = None,  # noqa: ANN001
        flower: bool = True) -> dict:
    """Both runs; their files (logs included) go to `work_dir`, kept, or to a temporary folder."""
    sizes = adapter_sizes()
    with tempfile.TemporaryDirectory(prefix="lc-overhead-") as tmp:
        work = Path(work_dir or tmp)
        lc = run_loracommons(work / "lc", rounds, steps, timeout, log)
        plain = run_plain_flower(work / "plain", rounds, sizes, timeout, log) if flower else None
    lc["summary"] = summary(lc["rounds"])
    ratio = None
    if plain is not None:
        plain["summary"] = summary(plain["rounds"])
        ratio = lc["summary"]["mean_overhead_s"] / plain["summary"]["mean_overhead_s"]
    overhead = lc["summary"]["mean_overhead_s"]
    return {
        "bench": "overhead",
        "date": benchlib.now(),
        "machine": benchlib.machine_info(),
        "config": {
            "rounds": rounds,
            "volunteers": 2,
            "lc_train_steps_per_round": steps,
            "mode": "ffa",
            "payload_dtype": "float32",
            "sizes": sizes,
            "round_definition": "from one round's start to the next round's start (last round: to the "
            "end of the round loop), minus the longest volunteer training time",
            "plain_flower": "FedAvg (fraction_evaluate=0) with stock Grid.send_and_receive; the "
            "ClientApp replies with b_floats float32 values, the server sends a_floats + b_floats",
        },
        "loracommons": lc,
        "plain_flower": plain,
        "ratio_steady_overhead": None if ratio is None else round(ratio, 3),
        "target": {
            "ratio_at_most": TARGET_RATIO,
            "overhead_s_at_most": TARGET_OVERHEAD_S,
            "met": overhead <= TARGET_OVERHEAD_S and (ratio is None or ratio <= TARGET_RATIO),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rounds", type=int, default=4, help="rounds of each run (round 1 is reported apart)"
    )
    parser.add_argument("--steps", type=int, default=2, help="LoRA Commons training steps per round")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds each run may take")
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="keep projects and logs here (must not exist)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--no-flower", action="store_true", help="LoRA Commons only (a quick look; needs --out)"
    )
    args = parser.parse_args(argv)
    if args.no_flower and args.out == DEFAULT_OUT:
        parser.error("--no-flower writes no comparison: give --out elsewhere")
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be at least 1")
    if args.work_dir is not None and args.work_dir.exists():
        parser.error(f"--work-dir {args.work_dir} already exists")
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    report = run(args.rounds, args.steps, args.timeout, log, args.work_dir, flower=not args.no_flower)
    benchlib.write_json(args.out, report)
    lc = report["loracommons"]["summary"]
    line = f"{args.out}: overhead per round LoRA Commons {lc['mean_overhead_s']:.2f} s"
    if report["plain_flower"] is not None:
        line += (
            f", plain Flower {report['plain_flower']['summary']['mean_overhead_s']:.2f} s, "
            f"ratio {report['ratio_steady_overhead']:.2f}"
        )
    print(f"{line}; parts {lc.get('mean_parts_s', {})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
