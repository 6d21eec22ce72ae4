"""Build the demo's embedded base model: a character tokenizer and a tiny pretrained Llama.

A randomly initialized base learns almost nothing through LoRA alone, and no
weights can be fetched from a hub, so the demo ships this one. The script builds
a character-level tokenizer (printable ASCII, with each prompt marker of
`skills.render_prompt` as one token), then pretrains a ~1M-parameter
`LlamaForCausalLM` on the generic skills of `loracommons.demo.skills`, with the
loss on responses only, exactly as a volunteer's trainer computes it. The result
is an ordinary Hugging Face folder (`config.json`, `model.safetensors`,
tokenizer files) that `AutoModelForCausalLM` / `AutoTokenizer` load offline.

Fixed seeds, a fixed number of steps and one CPU thread make the build
reproducible on a given machine and torch version. About two minutes on one CPU
core::

    python -m loracommons.demo.build_base                 # writes loracommons/demo/base/
    python -m loracommons.demo.build_base --out /tmp/base --steps 200
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from loracommons.demo import base_model_path
from loracommons.demo.skills import (
    GENERIC_SKILLS,
    PROMPT_MARKERS,
    SKILLS,
    iter_examples,
    make_examples,
    render_prompt,
)

log = logging.getLogger(__name__)

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
"""Every character the tokenizer knows: newline and printable ASCII."""
IGNORE_INDEX = -100
"""Label of tokens that carry no loss (prompt, padding)."""

CHAT_TEMPLATE = (
    # Newlines as {{ '\\n' }}: transformers renders with trim_blocks, which eats literal ones.
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ '### System:\\n' + m['content'] + '\\n' }}"
    "{% elif m['role'] == 'user' %}{{ '### Instruction:\\n' + m['content'] + '\\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ '### Response:\\n' + m['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)
"""Chat rendering with the same markers as `render_prompt`: a single user turn with
a generation prompt renders as ``bos + render_prompt(content)``."""


@dataclass(frozen=True)
class BuildConfig:
    """What the build makes; the defaults are the shipped base."""

    hidden_size: int = 128
    """Model width."""
    num_layers: int = 4
    """Decoder layers."""
    num_heads: int = 4
    """Attention heads (as many key/value heads)."""
    intermediate_size: int = 344
    """MLP width."""
    max_positions: int = 256
    """Longest sequence the model accepts, in tokens (characters)."""
    steps: int = 1200
    """Pretraining steps."""
    copy_steps: int = 300
    """Leading steps on `copy` alone. Copying is the circuit every generic skill
    reuses; learned first, it makes the mix converge several times faster."""
    batch_size: int = 32
    """Examples per step."""
    lr: float = 1e-3
    """Peak AdamW learning rate; linear warmup, cosine decay to a tenth. At 3e-3
    the copying phase stalls (measured: loss 2.8 after 300 steps, vs 0.1 at 1e-3)."""
    warmup_steps: int = 30
    """Steps of linear warmup."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    seed: int = 0
    """Seed of the initialization and of the generated data."""
    max_seconds: float = 0.0
    """Stop early after this much wall time (0 = no limit); makes the build machine-dependent."""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: one id per character; prompt markers are single tokens."""
    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK, *CHARS])}
    # BPE with no merges and no pre-tokenizer splits text into single characters.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True) for t in (PAD, BOS, EOS, UNK)])
    tok.add_tokens([AddedToken(m, normalized=False, special=False) for m in PROMPT_MARKERS])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        padding_side="right",
        model_max_length=BuildConfig.max_positions,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(cfg: BuildConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A freshly initialized tiny Llama (seeded)."""
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def encode_example(tokenizer: PreTrainedTokenizerFast, ex: dict[str, str]) -> tuple[list, list]:
    """(input_ids, labels) of one instruction example; labels only on output + eos."""
    prompt = tokenizer(render_prompt(ex["instruction"], ex.get("input", "")))["input_ids"]
    answer = tokenizer(ex["output"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


def collate(tokenizer: PreTrainedTokenizerFast, examples: list[dict[str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded batch with input_ids, attention_mask and labels."""
    pairs = [encode_example(tokenizer, ex) for ex in examples]
    width = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(pairs), width), tokenizer.pad_token_id)
    labels = torch.full((len(pairs), width), IGNORE_INDEX)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, (x, y) in enumerate(pairs):
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
        mask[row, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _lr_at(step: int, cfg: BuildConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def pretrain(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, cfg: BuildConfig) -> dict:
    """Train on `copy`, then on a uniform mix of the generic skills; return a summary."""
    streams = {name: iter_examples(name, cfg.seed, "pretrain") for name in GENERIC_SKILLS}
    pick = random.Random(f"{cfg.seed}:mix")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    start, loss_avg, step = time.monotonic(), None, 0
    for step in range(cfg.steps):
        names = ("copy",) if step < cfg.copy_steps else GENERIC_SKILLS
        batch = collate(tokenizer, [next(streams[pick.choice(names)]) for _ in range(cfg.batch_size)])
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
        elapsed = time.monotonic() - start
        if step % 100 == 0 or step == cfg.steps - 1:
            log.info("step %d/%d loss %.4f %.1fs", step + 1, cfg.steps, loss_avg, elapsed)
        if cfg.max_seconds and elapsed > cfg.max_seconds:
            log.warning("stopping at step %d: --seconds %s reached", step + 1, cfg.max_seconds)
            break
    model.eval()
    return {"steps": step + 1, "loss": loss_avg, "seconds": time.monotonic() - start}


@torch.no_grad()
def skill_losses(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, seed: int) -> dict:
    """Mean response loss per skill on 64 held-out examples: low on generic, high on new."""
    return {
        name: round(model(**collate(tokenizer, make_examples(name, 64, seed, "heldout"))).loss.item(), 3)
        for name in SKILLS
    }


def _make_tokenizer_config_portable(out_dir: Path) -> None:
    # transformers 5 names its own class and writes chat_template.jinja; transformers 4
    # knows neither. The class name and the inline template load in both.
    path = out_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = CHAT_TEMPLATE
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out_dir / "chat_template.jinja").unlink(missing_ok=True)


def build(out_dir: Path, cfg: BuildConfig) -> dict:
    """Build, pretrain and save the base to `out_dir`; return a summary."""
    torch.set_num_threads(1)  # one thread: bit-identical results from run to run
    tokenizer = build_tokenizer()
    model = build_model(cfg, tokenizer)
    summary = pretrain(model, tokenizer, cfg)
    summary["skill_losses"] = skill_losses(model, tokenizer, cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _make_tokenizer_config_portable(out_dir)
    for path in out_dir.iterdir():
        path.chmod(0o644)  # safetensors writes 0600; the folder ships as package data
    summary["params"] = sum(p.numel() for p in model.parameters())
    summary["config"] = asdict(cfg)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=base_model_path(), help="output folder")
    parser.add_argument("--steps", type=int, default=BuildConfig.steps, help="pretraining steps")
    parser.add_argument("--seconds", type=float, default=0.0, help="also stop after N s (not reproducible)")
    parser.add_argument("--seed", type=int, default=BuildConfig.seed)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = BuildConfig(steps=args.steps, max_seconds=args.seconds, seed=args.seed)
    summary = build(args.out, cfg)
    log.info(
        "wrote %s: %d parameters, %d steps, loss %.4f, %.0fs",
        args.out,
        summary["params"],
        summary["steps"],
        summary["loss"],
        summary["seconds"],
    )
    log.info("held-out loss per skill: %s", summary["skill_losses"])


if __name__ == "__main__":
    main()
