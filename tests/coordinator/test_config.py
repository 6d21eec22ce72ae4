"""project.toml: defaults round-trip, bad values name key and value, every key documented."""

from __future__ import annotations

import dataclasses
import re
import stat

import pytest
import tomllib

from loracommons.coordinator.config import (
    CONFIG_FILE,
    RELEASE_KEY,
    SECTIONS,
    ConfigError,
    ProjectConfig,
    init_project,
    key_info,
    load_config,
    render_toml,
)
from loracommons.protocol.identity import SigningKey
from loracommons.protocol.schedule import FLOOR as LR_FLOOR
from loracommons.protocol.task import RoundTask


def _write(tmp_path, text: str):
    (tmp_path / CONFIG_FILE).write_text(text)
    return tmp_path


def test_defaults_round_trip(tmp_path):
    _write(tmp_path, render_toml())
    assert load_config(tmp_path) == ProjectConfig()


def test_empty_file_is_all_defaults(tmp_path):
    assert load_config(_write(tmp_path, "")) == ProjectConfig()


def test_rendered_file_documents_every_key():
    lines = render_toml().splitlines()
    documented = {}
    section = None
    for i, line in enumerate(lines):
        if m := re.match(r"^\[(\w+)\]$", line):
            section = m.group(1)
        elif m := re.match(r"^(\w+) = ", line):
            assert lines[i - 1].startswith("# ") and "(default " in lines[i - 1], line
            documented.setdefault(section, set()).add(m.group(1))
    assert documented == {s: set(key_info(cls)) for s, cls in SECTIONS.items()}


BAD = [
    ("project", "id", "Has Spaces", "expected 1-64 of a-z 0-9 . _ - starting with a letter or digit"),
    ("project", "membership", "closed", "expected one of open, allowlist"),
    ("project", "seed", -1, "expected at least 0"),
    ("project", "base_model", "", "must not be empty"),
    ("lora", "r", 0, "expected at least 1"),
    ("lora", "r", 8.0, "expected an integer"),
    ("lora", "alpha", "big", "expected a finite number"),
    ("lora", "dropout", 1.0, "expected less than 1"),
    ("lora", "target_modules", "q_proj", "expected a list of names"),
    ("lora", "target_modules", [], "must not be empty"),
    ("train", "max_steps", 0, "expected at least 1"),
    ("train", "learning_rate", 0, "expected greater than 0"),
    ("train", "batch_size", True, "expected an integer"),
    ("round", "volunteers_per_round", 0, "expected at least 1"),
    ("round", "timeout_s", -5, "expected greater than 0"),
    ("round", "publish_every", 0, "expected at least 1"),
    ("aggregation", "mode", "avg", "expected one of ffa, exact, fedavg"),
    ("aggregation", "clip", "mean", "expected one of none, median"),
    ("aggregation", "robust", "median", "expected one of none, trimmed_mean, krum"),
    ("aggregation", "trim_fraction", 0.5, "expected less than 0.5"),
    ("aggregation", "free_rider_ratio", 1.0, "expected less than 1"),
    ("aggregation", "max_norm", -1.0, "expected at least 0"),
    ("aggregation", "max_examples_weight", 0, "expected at least 1"),
    ("privacy", "dp", "yes", "expected true or false"),
    ("privacy", "delta", 1.0, "expected less than 1"),
    ("privacy", "noise_multiplier", 0.0, "expected greater than 0"),
    ("limits", "payload_dtype", "int8", "expected one of float32, float16, bfloat16"),
    ("limits", "max_payload_bytes", 10, "expected at least 1024"),
    ("network", "http_port", 70000, "expected at most 65535"),
]


def _toml(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    return repr(value)


@pytest.mark.parametrize(("section", "key", "value", "problem"), BAD, ids=[f"{s}.{k}" for s, k, *_ in BAD])
def test_bad_value_names_key_and_value(tmp_path, section, key, value, problem):
    _write(tmp_path, f"[{section}]\n{key} = {_toml(value)}\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(info.value) == f"[{section}] {key} = {value!r}: {problem}"


def test_mode_message_is_exact(tmp_path):
    _write(tmp_path, '[aggregation]\nmode = "avg"\n')
    with pytest.raises(
        ConfigError, match=re.escape("[aggregation] mode = 'avg': expected one of ffa, exact, fedavg")
    ):
        load_config(tmp_path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[aggregation]\nmodee = "ffa"\n', "[aggregation] unknown key 'modee'"),
        ("[aggregaton]\n", "unknown section [aggregaton]"),
        ("aggregation = 3\n", "[aggregation] must be a table"),
        ("[round\n", "invalid TOML"),
    ],
)
def test_unknown_or_broken_refused(tmp_path, text, message):
    _write(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(tmp_path)


COMBOS = [
    ("[round]\nvolunteers_per_round = 3\nmin_volunteers = 5\n", "[round] min_volunteers = 5: exceeds"),
    (
        '[round]\nvolunteers_per_round = 10\nmin_volunteers = 4\n[aggregation]\nrobust = "trimmed_mean"\n'
        "trim_fraction = 0.2\n",
        "[aggregation] trim_fraction = 0.2: trims floor(0.2 x 4) = 0",
    ),
    (
        '[round]\nvolunteers_per_round = 10\nmin_volunteers = 10\n[aggregation]\nmode = "exact"\n'
        'robust = "trimmed_mean"\n',
        "[aggregation] robust = 'trimmed_mean': not defined for mode = 'exact'",
    ),
    (
        '[round]\nvolunteers_per_round = 10\nmin_volunteers = 4\n[aggregation]\nrobust = "krum"\n'
        "krum_f = 1\n",
        "[aggregation] krum_f = 1: krum needs more than 2f+2 = 4 updates; min_volunteers = 4",
    ),
    (
        '[round]\nvolunteers_per_round = 10\nmin_volunteers = 8\n[aggregation]\nrobust = "krum"\n'
        "krum_f = 0\n",
        "[aggregation] krum_f = 0: krum with f = 0",
    ),
    (
        '[round]\nmin_volunteers = 1\n[aggregation]\nclip = "median"\n',
        "[aggregation] clip = 'median': one update is always its own median",
    ),
    (
        "[round]\nmin_volunteers = 1\n[aggregation]\nfree_rider_ratio = 0.1\n",
        "[aggregation] free_rider_ratio = 0.1: one update is always its own median",
    ),
    ("[aggregation]\nexact_sketch_rank = 8\n", "[aggregation] exact_sketch_rank = 8: must be 0 or at least"),
    ('[aggregation]\nmode = "exact"\n[privacy]\ndp = true\n', "[privacy] dp = True: not supported with mode"),
    (
        '[round]\nvolunteers_per_round = 10\nmin_volunteers = 10\n[aggregation]\nrobust = "trimmed_mean"\n'
        "[privacy]\ndp = true\n",
        "[privacy] dp = True: cannot be combined with robust",
    ),
    (
        '[round]\nmin_volunteers = 3\n[aggregation]\nclip = "median"\n[privacy]\ndp = true\n',
        "[privacy] dp = True: clips to [privacy] clip_norm",
    ),
    ("[network]\nhttp_port = 9092\n", "[network] http_port = 9092: already used by fleet_port"),
    ('[round]\nlr_schedule = "cosine"\n', "[round] lr_schedule = 'cosine': needs [round] rounds > 0"),
]


@pytest.mark.parametrize(("text", "message"), COMBOS)
def test_contradictions_and_silent_rules_refused(tmp_path, text, message):
    _write(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(tmp_path)


def test_robust_settings_that_do_work_load(tmp_path):
    _write(
        tmp_path,
        '[round]\nvolunteers_per_round = 10\nmin_volunteers = 5\n[aggregation]\nrobust = "krum"\n'
        'krum_f = 1\nclip = "median"\nfree_rider_ratio = 0.1\n',
    )
    cfg = load_config(tmp_path)
    assert (cfg.aggregation.robust, cfg.round.min_volunteers) == ("krum", 5)


def test_hand_built_config_is_validated_too():
    import dataclasses

    with pytest.raises(ConfigError, match=r"\[round\] min_volunteers = 0"):
        dataclasses.replace(
            ProjectConfig(), round=dataclasses.replace(ProjectConfig().round, min_volunteers=0)
        )


def test_init_project_writes_documented_config_and_key(tmp_path):
    d = tmp_path / "proj"
    cfg = init_project(
        d,
        "some/model",
        mode="exact",
        membership="allowlist",
        revision="abc123",
        round={"min_volunteers": 1, "volunteers_per_round": 4},
        lora={"r": 8},
    )
    assert load_config(d) == cfg
    assert (cfg.project.base_model, cfg.project.base_model_revision, cfg.aggregation.mode) == (
        "some/model",
        "abc123",
        "exact",
    )
    assert (cfg.project.membership, cfg.round.min_volunteers, cfg.lora.r) == ("allowlist", 1, 8)
    assert re.match(r"^model-community-adapter-[0-9a-f]{8}$", cfg.project.id)
    key_path = d / RELEASE_KEY
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert SigningKey.load(key_path).public.key_type == "ssh-ed25519"
    text = (d / CONFIG_FILE).read_text()
    assert "# publish a signed release every k aggregated rounds" in text
    assert tomllib.loads(text)["aggregation"]["mode"] == "exact"


def test_init_refuses_existing_project_and_bad_values(tmp_path):
    init_project(tmp_path / "p", "m")
    with pytest.raises(ConfigError, match="already holds a project"):
        init_project(tmp_path / "p", "m")
    with pytest.raises(ConfigError, match="mode = 'avg'"):
        init_project(tmp_path / "q", "m", mode="avg")
    assert not (tmp_path / "q" / CONFIG_FILE).exists() and not (tmp_path / "q" / RELEASE_KEY).exists()
    assert init_project(tmp_path / "x", "m").project.id != init_project(tmp_path / "y", "m").project.id


def test_round_task_from_config():
    cfg = ProjectConfig()
    task = cfg.task(3, "ff" * 16, "0" * 64)
    again = RoundTask.from_bytes(task.to_bytes())
    assert again == task
    assert (task.mode, task.lora, task.payload_dtype) == ("ffa", cfg.lora, "float32")


def test_the_learning_rate_schedule_shapes_each_task():
    """`[round] lr_schedule`: constant leaves every task at train.learning_rate; cosine starts there in
    round 1 and ends at a tenth in the last round (and after), decreasing between; async places a task by
    the version its update goes into (`progress`), not by its serial."""
    peak = 0.01
    flat = ProjectConfig.from_dict({"round": {"rounds": 5}, "train": {"learning_rate": peak}})
    assert {flat.task(n, "ff" * 16, "0" * 64).train for n in range(1, 8)} == {flat.train}
    cosine = ProjectConfig.from_dict({"round": {"rounds": 5, "lr_schedule": "cosine"},
                                      "train": {"learning_rate": peak}})
    rates = [cosine.task(n, "ff" * 16, "0" * 64).train.learning_rate for n in range(1, 8)]
    assert rates[0] == peak and rates[4] == pytest.approx(peak * LR_FLOOR) and rates[5:] == [rates[4]] * 2
    assert all(a > b for a, b in zip(rates[:4], rates[1:5], strict=True))
    assert rates[2] == pytest.approx(peak * (1 + LR_FLOOR) / 2)  # half way: half way down
    assert cosine.task(40, "ff" * 16, "0" * 64, progress=3).train.learning_rate == rates[2]
    task = cosine.task(3, "ff" * 16, "0" * 64)
    assert RoundTask.from_bytes(task.to_bytes()) == task  # the volunteer takes the scheduled rate as is
    assert dataclasses.replace(task.train, learning_rate=peak) == cosine.train  # only the rate moves


def test_init_anneals_a_project_that_has_an_end(tmp_path):
    """`init` writes lr_schedule = cosine where it is given a number of rounds (the demo's measured best)
    unless told otherwise; an open-ended project (rounds = 0) keeps the constant rate cosine cannot do."""
    ended = init_project(tmp_path / "a", "some/model", round={"rounds": 40})
    assert (ended.round.rounds, ended.round.lr_schedule) == (40, "cosine")
    assert load_config(tmp_path / "a").round.lr_schedule == "cosine"
    assert init_project(tmp_path / "b", "some/model").round.lr_schedule == "constant"
    told = init_project(tmp_path / "c", "some/model", round={"rounds": 40, "lr_schedule": "constant"})
    assert told.round.lr_schedule == "constant"
