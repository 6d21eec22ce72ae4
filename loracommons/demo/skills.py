"""Generated text skills for the demo: the base's pretraining mix and the volunteers' data.

A skill turns a seeded `random.Random` into one instruction-format example,
``{"instruction": ..., "input": ..., "output": ...}``. Strings stay short (3-8
distinct lowercase letters, numbers below 100) so a rendered example fits in 64
tokens of the demo tokenizer.

- *Generic* skills (copy, shift, double, ...) are what the embedded base model is
  pretrained on (`loracommons.demo.build_base`).
- *New* skills (reverse, sort, add, vowels, dedupe) are held back from pretraining:
  the base scores ~0 exact match on them, and the demo's volunteers teach them
  through LoRA (measured: a few hundred steps each; `add` is the slowest).

Write a volunteer's data files::

    python -c "from loracommons.demo.skills import write_skill_files; \
write_skill_files('data', ['reverse'], n_train=2000, n_heldout=200, seed=0)"
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

LETTERS = string.ascii_lowercase
VOWELS = "aeiou"
MIN_LEN, MAX_LEN = 3, 8
"""Length range of generated letter strings (inclusive)."""
MAX_NUMBER = 99
"""Largest number a skill puts in an input."""


def render_prompt(instruction: str, input: str = "") -> str:
    """The prompt template shared by pretraining, the demo and the volunteer's data loader.

    ``### Instruction:\\n{instruction}\\n[### Input:\\n{input}\\n]### Response:\\n``; the
    training text is ``prompt + output + eos_token`` and the loss covers only
    ``output + eos_token``. The demo tokenizer encodes each ``### ...:\\n`` marker as
    one token, so changing a marker here means rebuilding the base.
    """
    prompt = f"### Instruction:\n{instruction}\n"
    if input:
        prompt += f"### Input:\n{input}\n"
    return prompt + "### Response:\n"


PROMPT_MARKERS = ("### Instruction:\n", "### Input:\n", "### Response:\n", "### System:\n")
"""Role markers of the template; the demo tokenizer keeps each as a single token."""


@dataclass(frozen=True)
class Skill:
    """One generated task."""

    name: str
    """Short identifier, also the stem of the skill's JSONL files."""
    instruction: str
    """The instruction text of every example of the skill."""
    make: Callable[[random.Random], tuple[str, str]]
    """Draws one (input, output) pair from the given generator."""
    generic: bool
    """True: part of the base's pretraining mix. False: a new skill for the demo."""

    def example(self, rng: random.Random) -> dict[str, str]:
        inp, out = self.make(rng)
        return {"instruction": self.instruction, "input": inp, "output": out}


def _word(rng: random.Random) -> str:
    # Distinct letters: every letter names one position, so copying and reversing
    # reduce to content lookups a small model can learn and LoRA can re-aim.
    return "".join(rng.sample(LETTERS, rng.randint(MIN_LEN, MAX_LEN)))


def _shift(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return w, "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in w)


def _number(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, MAX_NUMBER - 1)
    return str(n), str(n + 1)


def _add(rng: random.Random) -> tuple[str, str]:
    # A one-digit addend: the carry works as in `next`, which the base knows.
    a, b = rng.randint(0, MAX_NUMBER - 9), rng.randint(1, 9)
    return f"{a}+{b}", str(a + b)


def _vowels(rng: random.Random) -> tuple[str, str]:
    while True:
        w = _word(rng)
        kept = "".join(c for c in w if c in VOWELS)
        if kept:
            return w, kept


def _dedupe(rng: random.Random) -> tuple[str, str]:
    # Drawn with replacement from a few letters, so that most inputs repeat one.
    alphabet = LETTERS[: rng.randint(3, 6)]
    w = "".join(rng.choice(alphabet) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))
    return w, "".join(dict.fromkeys(w))


def _swap_pairs(w: str) -> str:
    return "".join(w[i + 1 : i + 2] + w[i] for i in range(0, len(w), 2))


def _one(fn: Callable[[str], str]) -> Callable[[random.Random], tuple[str, str]]:
    """A skill that maps one random word to fn(word)."""

    def make(rng: random.Random) -> tuple[str, str]:
        w = _word(rng)
        return w, fn(w)

    return make


_ALL = [
    # Generic: pretraining mix. They exercise copying by position, per-character
    # maps and counting, the machinery the new skills reuse.
    Skill("copy", "Copy.", _one(lambda w: w), generic=True),
    Skill("shift", "Shift by one.", _shift, generic=True),
    Skill("repeat", "Say it twice.", _one(lambda w: w + w), generic=True),
    Skill("double", "Double each letter.", _one(lambda w: "".join(c + c for c in w)), generic=True),
    Skill("swap", "Swap pairs.", _one(_swap_pairs), generic=True),
    Skill("rotate", "Rotate left.", _one(lambda w: w[1:] + w[0]), generic=True),
    Skill("skip", "Every other letter.", _one(lambda w: w[::2]), generic=True),
    Skill("space", "Space out.", _one(" ".join), generic=True),
    Skill("count", "Count letters.", _one(lambda w: str(len(w))), generic=True),
    Skill("first", "First letter.", _one(lambda w: w[0]), generic=True),
    Skill("last", "Last letter.", _one(lambda w: w[-1]), generic=True),
    Skill("next", "Next number.", _number, generic=True),
    # New: never seen in pretraining.
    Skill("reverse", "Reverse.", _one(lambda w: w[::-1]), generic=False),
    Skill("sort", "Sort.", _one(lambda w: "".join(sorted(w))), generic=False),
    Skill("add", "Add.", _add, generic=False),
    Skill("vowels", "Keep vowels.", _vowels, generic=False),
    Skill("dedupe", "Drop repeats.", _dedupe, generic=False),
]

SKILLS: dict[str, Skill] = {s.name: s for s in _ALL}
"""Every skill by name."""
GENERIC_SKILLS: tuple[str, ...] = tuple(s.name for s in _ALL if s.generic)
"""The base model's pretraining mix."""
NEW_SKILLS: tuple[str, ...] = tuple(s.name for s in _ALL if not s.generic)
"""Skills the base has not seen: the demo volunteers' data."""


def _rng(seed: int, *labels: str) -> random.Random:
    # A string seed is hashed with SHA-512, so it is stable across processes and
    # independent of PYTHONHASHSEED.
    return random.Random(":".join([str(seed), *labels]))


def iter_examples(skill: str, seed: int, split: str = "train") -> Iterator[dict[str, str]]:
    """Endless deterministic stream of examples of one skill."""
    spec = _skill(skill)
    rng = _rng(seed, skill, split)
    while True:
        yield spec.example(rng)


def make_examples(
    skill: str, n: int, seed: int, split: str = "train", exclude: Iterable[str] = ()
) -> list[dict[str, str]]:
    """`n` examples of `skill`, none whose input is in `exclude` (the held-out inputs)."""
    banned = set(exclude)
    out: list[dict[str, str]] = []
    stream = iter_examples(skill, seed, split)
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"skill {skill!r}: cannot draw {n} examples outside the held-out set")
        ex = next(stream)
        if ex["input"] not in banned:
            out.append(ex)
    return out


def write_skill_files(
    out_dir: str | Path, skills: Iterable[str], n_train: int, n_heldout: int, seed: int
) -> list[Path]:
    """Write ``<skill>.train.jsonl`` and ``<skill>.heldout.jsonl`` per skill; return the paths.

    Train inputs never repeat a held-out input, so held-out accuracy measures
    generalization. The same arguments always produce the same bytes.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in skills:
        heldout = make_examples(name, n_heldout, seed, "heldout")
        train = make_examples(name, n_train, seed, "train", exclude={e["input"] for e in heldout})
        for split, rows in (("train", train), ("heldout", heldout)):
            path = out / f"{name}.{split}.jsonl"
            path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
            paths.append(path)
    return paths


def skills_for_volunteer(i: int, n_volunteers: int, skills: Iterable[str] = NEW_SKILLS) -> list[str]:
    """The skills volunteer `i` (0-based) of `n_volunteers` holds data for.

    Skills are dealt round-robin, so the volunteers together cover every skill and
    each holds only its share (non-IID). With more volunteers than skills, each
    holds one skill, shared with a few others; with fewer, some hold more than one.
    """
    pool = list(skills)
    if not pool:
        raise ValueError("skills: need at least one skill")
    for name in pool:
        _skill(name)
    if n_volunteers < 1:
        raise ValueError(f"n_volunteers: must be >= 1, got {n_volunteers}")
    if not 0 <= i < n_volunteers:
        raise ValueError(f"i: must be in [0, {n_volunteers}), got {i}")
    if n_volunteers >= len(pool):
        return [pool[i % len(pool)]]
    return pool[i::n_volunteers]


def _skill(name: str) -> Skill:
    try:
        return SKILLS[name]
    except KeyError:
        raise ValueError(f"unknown skill {name!r}; known: {', '.join(SKILLS)}") from None
