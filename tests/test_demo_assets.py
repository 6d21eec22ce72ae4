"""The embedded demo base model and the generated skill data."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import transformers

from loracommons.demo import base_model_path
from loracommons.demo.skills import (
    GENERIC_SKILLS,
    NEW_SKILLS,
    SKILLS,
    make_examples,
    render_prompt,
    skills_for_volunteer,
    write_skill_files,
)


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(base_model_path())


@pytest.fixture(scope="module")
def model():
    return transformers.AutoModelForCausalLM.from_pretrained(base_model_path()).eval()


def _greedy_exact_match(model, tokenizer, skill: str, n: int = 32) -> float:
    examples = make_examples(skill, n, seed=1234, split="heldout")
    hits = 0
    for ex in examples:
        enc = tokenizer(render_prompt(ex["instruction"], ex["input"]), return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=20, do_sample=False)
        answer = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        hits += answer == ex["output"]
    return hits / n


# -- the shipped base ---------------------------------------------------------------------


def test_shipped_base_is_a_small_llama(model):
    params = sum(p.numel() for p in model.parameters())
    assert model.config.model_type == "llama"
    assert 500_000 <= params <= 1_500_000
    on_disk = sum(f.stat().st_size for f in base_model_path().iterdir())
    assert on_disk < 6 * 2**20
    assert (base_model_path() / "model.safetensors").is_file()
    assert not list(base_model_path().glob("*.bin")), "only safetensors may ship"


@pytest.mark.parametrize(
    "text",
    [
        "hello world",
        "Add.\n12+30",
        "### Instruction:\nReverse.\n### Input:\nabc\n### Response:\ncba",
        "~!@#$%^&*()_+{}|:\"<>?`-=[]\\;',./ 0123456789 ABCxyz",
    ],
)
def test_tokenizer_round_trips(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_prompt_markers_are_single_tokens_and_prompt_is_a_prefix(tokenizer):
    prompt = render_prompt("Reverse.", "abc")
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(prompt + "cba" + tokenizer.eos_token)["input_ids"]
    # bos, marker, 8 chars, \n, marker, 3 chars, \n, marker
    assert len(prompt_ids) == 1 + 1 + 8 + 1 + 1 + 3 + 1 + 1
    assert full_ids[: len(prompt_ids)] == prompt_ids
    assert full_ids[len(prompt_ids) :] == [
        *tokenizer("cba", add_special_tokens=False)["input_ids"],
        tokenizer.eos_token_id,
    ]


def test_chat_template_matches_the_instruction_prompt(tokenizer):
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Reverse."}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == tokenizer.bos_token + render_prompt("Reverse.")


def test_base_knows_generic_skills_but_not_new_ones(model, tokenizer):
    assert _greedy_exact_match(model, tokenizer, "copy") >= 0.8
    assert _greedy_exact_match(model, tokenizer, "reverse") <= 0.2


# -- the generated data ---------------------------------------------------------------------


def test_render_prompt_template():
    assert render_prompt("Sort.", "cab") == "### Instruction:\nSort.\n### Input:\ncab\n### Response:\n"
    assert render_prompt("Say hi.") == "### Instruction:\nSay hi.\n### Response:\n"


@pytest.mark.parametrize("skill", sorted(SKILLS))
def test_generators_are_deterministic_and_well_formed(skill):
    a = make_examples(skill, 50, seed=7)
    assert a == make_examples(skill, 50, seed=7)
    assert a != make_examples(skill, 50, seed=8)
    for ex in a:
        assert set(ex) == {"instruction", "input", "output"}
        assert ex["input"] and ex["output"]
        assert len(render_prompt(ex["instruction"], ex["input"]) + ex["output"]) < 120


def test_new_skills_are_not_pretrained():
    assert len(NEW_SKILLS) >= 4
    assert not set(NEW_SKILLS) & set(GENERIC_SKILLS)


@pytest.mark.parametrize("n_volunteers", [1, 2, 3, 4, 5, 8])
def test_skills_per_volunteer_cover_all_and_are_non_iid(n_volunteers):
    held = [skills_for_volunteer(i, n_volunteers) for i in range(n_volunteers)]
    assert set().union(*held) == set(NEW_SKILLS)
    assert all(held)
    if n_volunteers >= 3:
        assert all(len(h) <= 2 for h in held)
        assert all(len(h) <= len(NEW_SKILLS) // 2 for h in held)


@pytest.mark.parametrize(("i", "n"), [(3, 3), (-1, 3), (0, 0)])
def test_skills_per_volunteer_rejects_bad_index(i, n):
    with pytest.raises(ValueError):
        skills_for_volunteer(i, n)


def test_write_skill_files(tmp_path):
    paths = write_skill_files(tmp_path / "a", ["reverse", "add"], n_train=40, n_heldout=10, seed=3)
    names = sorted(p.name for p in paths)
    assert names == [
        "add.heldout.jsonl",
        "add.train.jsonl",
        "reverse.heldout.jsonl",
        "reverse.train.jsonl",
    ]
    for skill in ("reverse", "add"):
        rows = {}
        for split, n in (("train", 40), ("heldout", 10)):
            lines = (tmp_path / "a" / f"{skill}.{split}.jsonl").read_text().splitlines()
            rows[split] = [json.loads(line) for line in lines]
            assert len(rows[split]) == n
            for row in rows[split]:
                assert set(row) == {"instruction", "input", "output"}
                assert all(isinstance(v, str) for v in row.values())
        assert not {r["input"] for r in rows["train"]} & {r["input"] for r in rows["heldout"]}
    again = write_skill_files(tmp_path / "b", ["reverse", "add"], n_train=40, n_heldout=10, seed=3)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]


def test_unknown_skill_is_named():
    with pytest.raises(ValueError, match="'nope'"):
        make_examples("nope", 1, seed=0)


# -- the build script ----------------------------------------------------------------------


def test_build_base_script_writes_a_loadable_reproducible_folder(tmp_path):
    from loracommons.demo import build_base

    digests = []
    for name in ("one", "two"):
        build_base.main(["--out", str(tmp_path / name), "--steps", "2"])
        digests.append(hashlib.sha256((tmp_path / name / "model.safetensors").read_bytes()).digest())
    assert digests[0] == digests[1]
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "one")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "one")
    ids = tok(render_prompt("Copy.", "abc"), return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], len(tok))


def _scores(em: float, loss: float = 1.0) -> dict:
    return {"exact_match": em, "heldout_loss": loss}


def test_report_says_per_skill_whether_joining_helped_the_holder():
    from loracommons.demo.report import POOLED, summarize

    plan = {"skills": ["reverse", "vowels", "dedupe"],
            "volunteers": [{"name": f"volunteer-{i}", "skills": [k]}
                           for i, k in enumerate(["reverse", "vowels", "dedupe"])]}
    alone = {"reverse": 1.0, "vowels": 0.85, "dedupe": 0.9}
    models = {"base": {k: _scores(0.0, 5.0) for k in alone}}
    for i, k in enumerate(alone):
        models[f"volunteer-{i} (local only)"] = {j: _scores(alone[k] if j == k else 0.0) for j in alone}
    models[POOLED] = {k: _scores(0.9) for k in alone}
    models["community"] = {"reverse": _scores(0.75, 0.2), "vowels": _scores(0.9, 0.2),
                           "dedupe": _scores(0.85, 0.2)}
    report = summarize(plan, models)
    rows = {row["skill"]: row for row in report["holders"]}
    assert rows["reverse"]["holders"] == ["volunteer-0"] and rows["reverse"]["alone"] == 1.0
    assert rows["reverse"]["joining_helped"] == "no"  # 25 points below its holder alone
    assert rows["vowels"]["joining_helped"] == "yes" and rows["dedupe"]["joining_helped"] == "kept"
    assert rows["dedupe"]["pooled"] == 0.9
    checks = report["checks"]
    assert checks["community_at_least_80%_on_every_skill"] is False
    assert checks["community_within_10_points_of_the_holder_alone_on_every_skill"] is False
    assert checks["community_beats_base_on_every_skill"] is True
