"""Verification throughput of a signed update envelope, next to plain sha256 on the same bytes.

Builds a signed envelope of float32 LoRA factors (Llama-7B-like: hidden 4096, r=16,
A is r x 4096 and B is 4096 x r, 256 KiB each; 32 MiB is q_proj and v_proj on 32 layers),
then times, interleaved in the same run, `verify_update` (signature, claims, payload
sha256, header, names, shapes, dtypes, finiteness) and `hashlib.sha256` of the payload.
Verification hashes the payload once and checks finiteness on zero-copy views, so the
ratio verify/sha256 says how little it adds to the one hash it cannot avoid.

    python bench/protocol_bench.py                       # 32 MiB, 5 repeats
    python bench/protocol_bench.py --mb 1 --repeat 1 --dtype bfloat16 --out /tmp/protocol.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from loracommons.protocol.codec import DTYPES, TensorSpec, decode_tensors, encode_tensors
from loracommons.protocol.envelope import Envelope, Expected, sign_update, verify_update
from loracommons.protocol.identity import SigningKey

HIDDEN, RANK = 4096, 16
MODULES = ("q_proj", "v_proj")
DEFAULT_OUT = Path("bench/results/protocol.json")


def lora_tensors(mib: float, itemsize: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """LoRA factors for at least `mib` MiB of payload, named as PEFT saves them (float32 arrays)."""
    per_tensor = HIDDEN * RANK * itemsize
    count = max(2, math.ceil(mib * 2**20 / per_tensor / 2) * 2)  # whole A/B pairs
    rng = np.random.default_rng(seed)
    out = {}
    for pair in range(count // 2):
        layer, module = divmod(pair, len(MODULES))
        prefix = f"base_model.model.model.layers.{layer}.self_attn.{MODULES[module]}"
        out[f"{prefix}.lora_A.weight"] = rng.standard_normal((RANK, HIDDEN), dtype=np.float32)
        out[f"{prefix}.lora_B.weight"] = rng.standard_normal((HIDDEN, RANK), dtype=np.float32) * 1e-3
    return out


def build(mib: float, dtype: str = "float32") -> tuple[Envelope, Expected]:
    tensors = lora_tensors(mib, DTYPES[dtype][1])
    payload = encode_tensors(tensors, dtype)
    claims = {
        "project_id": "bench",
        "round": 1,
        "nonce": "00" * 16,
        "base_adapter_digest": hashlib.sha256(b"global adapter").hexdigest(),
        "base_model_id": "meta-llama/Llama-2-7b-hf",
        "base_model_revision": "main",
        "lora_config_digest": hashlib.sha256(b"lora config").hexdigest(),
    }
    env = sign_update(
        SigningKey.generate("volunteer"),
        payload,
        **claims,
        payload_dtype=dtype,
        examples=1000,
        steps=100,
        train_loss=1.0,
    )
    spec = TensorSpec({name: arr.shape for name, arr in tensors.items()}, frozenset({dtype}))
    return env, Expected(**claims, spec=spec, max_payload_bytes=spec.payload_bytes(dtype))


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(mib: float, repeat: int, dtype: str = "float32") -> dict:
    env, expected = build(mib, dtype)
    payload = env.payload
    verify_update(env, expected)  # warm-up: page in the payload, load OpenSSL paths
    hashlib.sha256(payload).digest()
    sha_s, verify_s, decode_s = [], [], []
    for _ in range(repeat):  # interleaved, so drift in clock or load hits both alike
        sha_s.append(_seconds(lambda: hashlib.sha256(payload).digest()))
        verify_s.append(_seconds(lambda: verify_update(env, expected)))
        decode_s.append(_seconds(lambda: decode_tensors(payload, max_bytes=len(payload), spec=expected.spec)))
    mb = len(payload) / 1e6
    sha_mb_s = mb / statistics.median(sha_s)
    verify_mb_s = mb / statistics.median(verify_s)
    return {
        "payload_bytes": len(payload),
        "payload_mib": round(len(payload) / 2**20, 3),
        "tensors": len(expected.spec.shapes),
        "dtype": dtype,
        "repeat": repeat,
        "unit": "MB/s = 1e6 bytes per second, from the median time",
        "verify_mb_s": round(verify_mb_s, 1),
        "sha256_mb_s": round(sha_mb_s, 1),
        "ratio": round(verify_mb_s / sha_mb_s, 3),
        "decode_only_mb_s": round(mb / statistics.median(decode_s), 1),
        "verify_s": verify_s,
        "sha256_s": sha_s,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0],
            "numpy": np.__version__,
        },
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=32, help="payload size in MiB (default 32)")
    parser.add_argument("--repeat", type=int, default=5, help="timed repetitions (default 5)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="payload dtype")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON result (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if args.mb <= 0 or args.repeat < 1:
        parser.error("--mb must be positive and --repeat at least 1")
    result = run(args.mb, args.repeat, args.dtype)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    size = f"{result['payload_mib']:g} MiB {args.dtype}, {result['tensors']} tensors"
    print(
        f"verify {result['verify_mb_s']:.0f} MB/s, sha256 {result['sha256_mb_s']:.0f} MB/s, "
        f"ratio {result['ratio']:.2f} ({size}) -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
