"""Tokens/s of the volunteer trainer next to a bare peft + torch loop, measured in the same run.

Both train the same LoRA (exact mode: A and B) on the same tiny Llama built
from a config (hidden 128, 4 layers), from the same starting adapter, on the
same random full-length token sequences, with the same batch and steps. The
bare loop is what one would write by hand: `model(input_ids, labels).loss`,
backward, AdamW step. The trainer adds its schedule, clipping, token-weighted
loss, budgets and progress callback; the ratio says what they cost.

    python bench/trainer_bench.py                          # CPU or the GPU, 30 steps of batch 16
    python bench/trainer_bench.py --steps 5 --batch 2 --out /tmp/t.json
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path

import torch
from peft import get_peft_model, set_peft_model_state_dict
from transformers import LlamaConfig, LlamaForCausalLM

from loracommons.client.data import TokenizedData
from loracommons.client.model import apply_adapter, pick_device, pick_dtype
from loracommons.client.trainer import train
from loracommons.protocol.lora import init_adapter, lora_config
from loracommons.protocol.task import LoraSettings, TrainSettings

MODEL = {"vocab_size": 256, "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 4, "intermediate_size": 344}
LORA = LoraSettings(r=16, alpha=32.0, dropout=0.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "trainer.json"


def build_model(seq_len: int, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL, max_position_embeddings=max(seq_len, 64)))
    return model.to(device=device, dtype=dtype).eval()


def random_data(examples: int, seq_len: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(4, MODEL["vocab_size"], (examples, seq_len), generator=generator)


def run_trainer(base, start: dict, ids: torch.Tensor, steps: int, batch: int) -> dict:
    rows = ids.tolist()
    data = TokenizedData(rows, [list(r) for r in rows], "text", pad_id=0, examples=len(rows))
    settings = TrainSettings(max_steps=steps, max_minutes=1e6, batch_size=batch, learning_rate=1e-3,
                             warmup_steps=min(10, steps), seq_len=ids.shape[1])
    model = apply_adapter(base, LORA, start, "exact")
    result = train(model, None, data, settings, "exact")
    return {"tokens_per_s": result.tokens_per_s, "seconds": result.seconds, "tokens": result.tokens,
            "steps": result.steps, "final_loss": result.losses[-1]}


def run_bare(bare, ids: torch.Tensor, steps: int, batch: int, device: torch.device) -> dict:
    """The hand-written loop: forward with labels, backward, AdamW, zero_grad."""
    params = [p for p in bare.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    generator = torch.Generator().manual_seed(2)
    bare.train()
    loss = torch.zeros(())
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        rows = torch.randint(0, ids.shape[0], (batch,), generator=generator)
        inputs = ids[rows].to(device)
        loss = bare(input_ids=inputs, labels=inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the trainer reads every step's loss too
    _sync(device)
    seconds = time.perf_counter() - start
    bare.eval()
    tokens = steps * batch * ids.shape[1]
    return {"tokens_per_s": tokens / seconds, "seconds": seconds, "tokens": tokens, "steps": steps,
            "final_loss": float(loss.detach())}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_info(device: torch.device) -> dict:
    import peft
    import transformers

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def bench(steps: int, batch: int, seq_len: int, repeats: int, device: torch.device) -> dict:
    dtype = pick_dtype(device)
    base = build_model(seq_len, device, dtype)
    bare = get_peft_model(copy.deepcopy(base), lora_config(LORA))
    start = init_adapter(copy.deepcopy(base).float(), LORA, seed=0)
    ids = random_data(max(4 * batch, 64), seq_len)
    trainer_runs, bare_runs = [], []
    run_trainer(base, start, ids, min(steps, 3), batch)  # warm-up: allocator, kernels, caches
    set_peft_model_state_dict(bare, {k: torch.from_numpy(v) for k, v in start.items()})
    run_bare(bare, ids, min(steps, 3), batch, device)
    for _ in range(repeats):  # interleaved, so drifting machine load hits both alike
        set_peft_model_state_dict(bare, {k: torch.from_numpy(v) for k, v in start.items()})
        bare_runs.append(run_bare(bare, ids, steps, batch, device))
        trainer_runs.append(run_trainer(base, start, ids, steps, batch))
    best_trainer = max(trainer_runs, key=lambda r: r["tokens_per_s"])
    best_bare = max(bare_runs, key=lambda r: r["tokens_per_s"])
    return {
        "benchmark": "trainer",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "config": {"steps": steps, "batch": batch, "seq_len": seq_len, "repeats": repeats, "mode": "exact",
                   "dtype": str(dtype).removeprefix("torch."), "model": MODEL, "lora": LORA.to_dict()},
        "trainer": {**best_trainer, "runs": trainer_runs},
        "bare_loop": {**best_bare, "runs": bare_runs},
        "ratio": best_trainer["tokens_per_s"] / best_bare["tokens_per_s"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per timed run")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each loop; the best counts")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file to write")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = bench(args.steps, args.batch, args.seq_len, args.repeats, pick_device(args.device))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"trainer {result['trainer']['tokens_per_s']:,.0f} tok/s, bare loop "
        f"{result['bare_loop']['tokens_per_s']:,.0f} tok/s, ratio {result['ratio']:.3f} -> {args.out}"
    )
    return result


if __name__ == "__main__":
    main()
