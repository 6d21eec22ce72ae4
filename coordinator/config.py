"""A project's configuration: `DIR/project.toml` read once into frozen, validated dataclasses.

Every key has a default, a unit and a one-line doc (field metadata), which
`render_toml` writes as comments, so `coordinator init` produces a file that
documents itself. A bad value fails with `ConfigError` naming the key and the
value; so do unknown keys and combinations where a robustness option would
silently do nothing.

    cfg = init_project("myproj", "loracommons/demo-tiny")   # writes project.toml + keys/release_key
    cfg = load_config("myproj")
    task = cfg.task(round=1, nonce=..., base_adapter_digest=...)

Past ~400 lines because it is the one declaration of every project.toml key with its doc,
unit and checks, and of what `init` chooses; splitting the schema would split that one list.
"""

from __future__ import annotations

import math
import re
import secrets
import sys
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from loracommons.protocol import modes, schedule
from loracommons.protocol.codec import DTYPES
from loracommons.protocol.identity import SigningKey
from loracommons.protocol.lora import DEMO_MODEL_ID
from loracommons.protocol.task import (
    DOWNLINK_DTYPES,
    LORA_BOUNDS,
    MAX_SEED,
    PAYLOAD_BOUNDS,
    PROJECT_ID_RE,
    TRAIN_BOUNDS,
    LoraSettings,
    RoundTask,
    TrainSettings,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_FILE = "project.toml"
RELEASE_KEY = Path("keys") / "release_key"
MEMBERSHIPS = ("open", "allowlist")
CLIP_RULES = ("none", "median")
SCHEDULES = ("sync", "async")
STALENESS_WEIGHTS = ("inverse_sqrt", "inverse", "constant")
LR_SCHEDULES = ("constant", "cosine")
NESTED_WEIGHTINGS = ("trained", "rank", "mass")  # coordinator.aggregation's column weights
ROBUST_RULES = ("none", "trimmed_mean", "krum")
_ID_RE = PROJECT_ID_RE


class ConfigError(ValueError):
    """A project configuration that cannot be used; the message names the key and value."""


def _key(default: Any, doc: str, unit: str = "", **checks: Any) -> Any:
    """A config field: default, one-line doc, unit, and checks (choices, ge, gt, le, lt, nonempty).

    `choices` may be a function returning them, asked at each validation (the mode registry).
    """
    return field(default=default, metadata={"doc": doc, "unit": unit, **checks})


@dataclass(frozen=True)
class ProjectSection:
    id: str = _key(
        "loracommons",
        "project id signed in every update and release (init makes a unique one)",
        pattern=_ID_RE,
    )
    name: str = _key(
        "LoRA Commons project", "display name shown on the dashboard and model cards", nonempty=True
    )
    base_model: str = _key(
        DEMO_MODEL_ID, "Hugging Face model id or local folder of the base model", nonempty=True
    )
    base_model_revision: str = _key(
        "main", "revision (branch, tag or commit) of the base model", nonempty=True
    )
    seed: int = _key(
        0, "seed of the initial global adapter (A factors are identical everywhere; in ffa volunteers "
        "regenerate A from it instead of downloading it)", ge=0, le=MAX_SEED,
    )
    membership: str = _key(
        "open", "open: any key may contribute; allowlist: only registered keys", choices=MEMBERSHIPS
    )
    license: str = _key(
        "other", "license of the released adapters, written in the model card (an SPDX id, or other)",
        nonempty=True,
    )


@dataclass(frozen=True)
class RoundSection:
    volunteers_per_round: int = _key(
        3, "volunteers sampled and sent the task each round (sync; async sends every free volunteer one)",
        "volunteers", ge=1,
    )
    min_volunteers: int = _key(
        2, "admitted updates needed to aggregate; fewer keeps the previous version", "updates", ge=1
    )
    timeout_s: float = _key(
        600.0, "how long a round waits for replies (async: how long one task may stay unanswered before "
        "its node gets another)", "seconds", gt=0
    )
    rounds: int = _key(
        0,
        "total rounds to run; 0 = run until stopped. More rounds of fewer steps (train.max_steps) cost "
        "more bytes and more syncs; fewer, longer rounds let volunteers with different data drift apart "
        "(demo, 300 steps per volunteer: 30 x 10 reaches 73% exact match, 10 x 30 47%; bench/README.md)",
        "rounds",
        ge=0,
    )
    downlink_dtype: str = _key(
        "float32",
        "dtype the global adapter travels to volunteers in (packed, lossless). bfloat16 halves the download: "
        "the coordinator then rounds every new global to bfloat16 after aggregation, so what it stores, "
        "sends, releases and names by digest is the rounded adapter everyone trains from",
        choices=DOWNLINK_DTYPES,
    )
    publish_every: int = _key(
        1,
        "publish a signed release every k aggregated rounds (and after the last); a larger k makes short "
        "rounds cheaper",
        "rounds",
        ge=1,
    )
    schedule: str = _key(
        "sync",
        "sync: sampled rounds that wait for their replies; async: every volunteer kept busy, updates "
        "folded into a buffer, a new version (a round) every buffer_size admitted updates (FedBuff)",
        choices=SCHEDULES,
    )
    buffer_size: int = _key(
        3, "async: admitted updates folded into each new version (FedBuff's K)", "updates", ge=1
    )
    max_staleness: int = _key(
        4,
        "async: refuse an update trained from a version more than this many versions older than the "
        "latest (staleness = versions closed since its base)",
        "versions",
        ge=0,
    )
    hold_fraction: float = _key(
        0.5,
        "async: a volunteer that has just replied waits, at most this fraction of its last task's time, "
        "when the updates in flight are expected to close the open version within that wait, so that "
        "its next task trains on the new version instead of one about to be replaced; 0 sends at once",
        "x task time",
        ge=0,
        le=1,
    )
    lr_schedule: str = _key(
        "constant",
        "the learning rate each round's task carries across the project: constant = train.learning_rate "
        "every round; cosine = from train.learning_rate in round 1 down to a tenth of it in the last "
        "(needs rounds > 0; async: by version). A volunteer's own schedule within a round is unchanged. "
        "Measured in process, 3 volunteers, 90 x 10: cosine ends at held-out loss 0.076 / 0.170 (data "
        "seeds 0 / 1), constant at 0.097 / 0.179; 6 volunteers, 30 x 10: 0.748 against 0.720, a short "
        "project gains nothing. init writes cosine when given rounds",
        choices=LR_SCHEDULES,
    )
    staleness_weight: str = _key(
        "inverse_sqrt",
        "async: factor on a stale update's weight in its version's mean (against the fresher updates "
        "beside it), tau = staleness: inverse_sqrt 1/sqrt(1+tau), inverse 1/(1+tau), constant 1",
        choices=STALENESS_WEIGHTS,
    )


@dataclass(frozen=True)
class AggregationSection:
    mode: str = _key(
        "ffa",
        "ffa: mean of B, A frozen; exact: rank-r SVD of mean B_i A_i; fedavg: separate means",
        choices=modes.names,
    )
    max_examples_weight: int = _key(10_000, "cap on the examples an update's weight counts", "examples", ge=1)
    clip: str = _key(
        "none",
        "none, or median: scale down deltas above clip_factor x the round's median norm",
        choices=CLIP_RULES,
    )
    clip_factor: float = _key(
        2.0, "clip bound as a multiple of the round's median delta norm", "x median", gt=0
    )
    robust: str = _key(
        "none",
        "none, trimmed_mean (coordinate-wise) or krum (Multi-Krum on flattened deltas)",
        choices=ROBUST_RULES,
    )
    trim_fraction: float = _key(
        0.2, "trimmed_mean: fraction of updates dropped at each end, per coordinate", "fraction", ge=0, lt=0.5
    )
    krum_f: int = _key(
        1, "krum: number of Byzantine updates tolerated (the f worst-scored are dropped)", "updates", ge=0
    )
    free_rider_ratio: float = _key(
        0.0,
        "reject deltas with norm below this fraction of the round median; 0 = off",
        "fraction",
        ge=0,
        lt=1,
    )
    max_norm: float = _key(
        0.0, "absolute bound on an update's delta norm, checked at admission; 0 = off", "L2 norm", ge=0
    )
    nested_weighting: str = _key(
        "rank",
        "ffa with volunteers below the project's rank: column j of B is the mean over those who trained "
        "it, weighted w_i x r/r_i (rank: each volunteer's total weight equal whatever its rank), w_i "
        "(trained), or w_i x r/r_i over all the round's weight (mass: unnormalized, may overshoot)",
        choices=NESTED_WEIGHTINGS,
    )
    exact_sketch_rank: int = _key(
        0, "exact: rank kept while folding (lossless below it); 0 = 4 x lora r", "rank", ge=0
    )
    server_lr: float = _key(
        1.0,
        "server step on the round's mean delta: new global = G + server_lr x (mean - G); 1 = the plain "
        "mean. Above 1 offsets the dilution of non-IID updates (each volunteer's progress is 1/N of the "
        "mean). Applies after clip and robust rules (exact: on the product B A); not with [privacy] dp",
        "x mean delta", gt=0, le=4,
    )


@dataclass(frozen=True)
class PrivacySection:
    dp: bool = _key(False, "central differential privacy: clip each delta to clip_norm, add Gaussian noise")
    noise_multiplier: float = _key(
        1.0, "noise std on the sum of deltas, in units of clip_norm", "x clip_norm", gt=0
    )
    clip_norm: float = _key(1.0, "L2 bound on each update's delta under dp", "L2 norm", gt=0)
    delta: float = _key(1e-5, "delta of the (epsilon, delta) guarantee reported", gt=0, lt=1)
    max_epsilon: float = _key(
        0.0, "stop training before epsilon would exceed this; 0 = no limit", "epsilon", ge=0
    )


@dataclass(frozen=True)
class LimitsSection:
    max_payload_bytes: int = _key(64 << 20, "largest update payload accepted", "bytes", **PAYLOAD_BOUNDS)
    payload_dtype: str = _key("float32", "dtype volunteers send their factors in", choices=tuple(DTYPES))


@dataclass(frozen=True)
class NetworkSection:
    host: str = _key("0.0.0.0", "address the SuperLink listens on", nonempty=True)
    fleet_port: int = _key(
        9092, "Flower SuperLink port volunteers connect to (Fleet API; Flower 1.42 serves all its APIs here)",
        "port", ge=1, le=65535,
    )
    http_host: str = _key("0.0.0.0", "address the read-only HTTP API and dashboard listen on", nonempty=True)
    http_port: int = _key(8000, "HTTP API and dashboard port", "port", ge=1, le=65535)


# protocol.task's dataclasses carry no metadata: their docs live here, their bounds there
# (LORA_BOUNDS, TRAIN_BOUNDS: the volunteer checks every task against the same ones).
_LORA_KEYS = {
    "r": {"doc": "rank of the factors A (r x in) and B (out x r)", "unit": "rank"},
    "alpha": {"doc": "scale numerator: the update is (alpha / r) x B @ A"},
    "dropout": {"doc": "dropout on the LoRA input during training", "unit": "probability"},
    "target_modules": {"doc": "module names that get LoRA factors"},
}
_TRAIN_KEYS = {
    "max_steps": {
        "doc": "optimizer steps per volunteer per round (whichever limit comes first); fewer steps = more "
        "frequent syncs: less drift on non-IID data, more rounds, bytes and syncs for the same training",
        "unit": "steps",
    },
    "max_minutes": {"doc": "wall-clock limit of local training per round", "unit": "minutes"},
    "batch_size": {"doc": "sequences per micro-batch", "unit": "sequences"},
    "grad_accum": {"doc": "micro-batches per optimizer step", "unit": "micro-batches"},
    "learning_rate": {"doc": "peak AdamW learning rate"},
    "warmup_steps": {"doc": "linear warmup of the learning rate: once per volunteer with keep_optimizer, "
                     "else at the start of each round", "unit": "steps"},
    "weight_decay": {"doc": "AdamW weight decay"},
    "seq_len": {"doc": "tokens per training sequence (longer ones are truncated)", "unit": "tokens"},
    "seed": {"doc": "seed of local data order and dropout"},
    "keep_optimizer": {
        "doc": "a volunteer keeps its AdamW moments and learning-rate warmup from its last round when "
        "it took part in the round before (mode ffa; it holds them in memory, two numbers per trained "
        "one); false restarts the optimizer and warmup every round. Demo, real runs: 80 x 10 rounds "
        "with it reach the exact match that 120 x 10 reached without it",
    },
}

SECTIONS: dict[str, type] = {
    "project": ProjectSection,
    "lora": LoraSettings,
    "train": TrainSettings,
    "round": RoundSection,
    "aggregation": AggregationSection,
    "privacy": PrivacySection,
    "limits": LimitsSection,
    "network": NetworkSection,
}
_EXTERNAL = {LoraSettings: _LORA_KEYS, TrainSettings: _TRAIN_KEYS}
_BOUNDS = {LoraSettings: LORA_BOUNDS, TrainSettings: TRAIN_BOUNDS}


def key_info(section_cls: type) -> dict[str, dict]:
    """name -> metadata (doc, unit, checks) plus its default, for one section class."""
    out = {}
    for f in fields(section_cls):
        if section_cls in _EXTERNAL:
            meta = {**_EXTERNAL[section_cls][f.name], **_BOUNDS[section_cls][f.name]}
        else:
            meta = dict(f.metadata)
        if callable(meta.get("choices")):
            meta["choices"] = tuple(meta["choices"]())
        factory = f.default_factory  # every key has a default or a factory
        meta["default"] = f.default if f.default is not MISSING else factory() if callable(factory) else None
        out[f.name] = meta
    return out


def config_error(section: str, key: str, value: Any, problem: str) -> ConfigError:
    """The one form of a config error: `[section] key = value: problem`."""
    return ConfigError(f"[{section}] {key} = {value!r}: {problem}")



def _check_value(section: str, key: str, value: Any, meta: dict) -> None:
    default = meta["default"]
    if isinstance(default, bool):
        ok = isinstance(value, bool)
        kind = "true or false"
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
        kind = "an integer"
    elif isinstance(default, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        kind = "a finite number"
    elif isinstance(default, tuple):
        ok = isinstance(value, tuple | list) and all(isinstance(v, str) and v for v in value)
        kind = "a list of names"
    else:
        ok = isinstance(value, str)
        kind = "a string"
    if not ok:
        raise config_error(section, key, value, f"expected {kind}")
    if "choices" in meta and value not in meta["choices"]:
        raise config_error(section, key, value, f"expected one of {', '.join(meta['choices'])}")
    if meta.get("nonempty") and not value:
        raise config_error(section, key, value, "must not be empty")
    if "pattern" in meta and not meta["pattern"].match(value):
        raise config_error(
            section, key, value, "expected 1-64 of a-z 0-9 . _ - starting with a letter or digit"
        )
    for check, holds, words in (
        ("ge", lambda v, b: v >= b, "at least"),
        ("gt", lambda v, b: v > b, "greater than"),
        ("le", lambda v, b: v <= b, "at most"),
        ("lt", lambda v, b: v < b, "less than"),
    ):
        if check in meta and not holds(value, meta[check]):
            raise config_error(section, key, value, f"expected {words} {meta[check]}")


@dataclass(frozen=True)
class ProjectConfig:
    project: ProjectSection = field(default_factory=ProjectSection)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    round: RoundSection = field(default_factory=RoundSection)
    aggregation: AggregationSection = field(default_factory=AggregationSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    network: NetworkSection = field(default_factory=NetworkSection)

    def __post_init__(self) -> None:
        for section, cls in SECTIONS.items():
            obj = getattr(self, section)
            if not isinstance(obj, cls):
                raise ConfigError(f"[{section}] must be a {cls.__name__}, got {type(obj).__name__}")
            for key, meta in key_info(cls).items():
                _check_value(section, key, getattr(obj, key), meta)
        _check_combinations(self)

    @property
    def sketch_rank(self) -> int:
        """Rank the exact aggregator keeps while folding."""
        return self.aggregation.exact_sketch_rank or 4 * self.lora.r

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out = {}
        for section in SECTIONS:
            values = asdict(getattr(self, section))
            out[section] = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        return out

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> ProjectConfig:
        """Build from parsed TOML; unknown sections or keys are refused."""
        unknown = sorted(set(obj) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"unknown section [{unknown[0]}] (known: {', '.join(SECTIONS)})")
        built = {}
        for section, section_cls in SECTIONS.items():
            values = obj.get(section, {})
            if not isinstance(values, dict):
                raise ConfigError(f"[{section}] must be a table, got {values!r}")
            info = key_info(section_cls)
            extra = sorted(set(values) - set(info))
            if extra:
                raise ConfigError(f"[{section}] unknown key {extra[0]!r} (known: {', '.join(info)})")
            for key, value in values.items():
                _check_value(section, key, value, info[key])
            if "target_modules" in values:
                values = {**values, "target_modules": tuple(values["target_modules"])}
            built[section] = section_cls(**values)
        return cls(**built)

    def round_train(self, n: int) -> TrainSettings:
        """The train settings of round (async: version) `n`: the learning rate on `[round] lr_schedule`."""
        factor = lr_factor_at(self.round.lr_schedule, n, self.round.rounds)
        if factor == 1.0:
            return self.train
        return replace(self.train, learning_rate=self.train.learning_rate * factor)

    def task(self, round: int, nonce: str, base_adapter_digest: str,
             progress: int | None = None, base_version: int | None = None) -> RoundTask:
        """The round task volunteers receive for `round`; `progress` (default `round`; async: the version
        the task's update goes into) places it on the project's learning-rate schedule; `base_version`
        (async) is the version it trains from."""
        return RoundTask(
            project_id=self.project.id,
            round=round,
            nonce=nonce,
            base_adapter_digest=base_adapter_digest,
            base_model_id=self.project.base_model,
            base_model_revision=self.project.base_model_revision,
            mode=self.aggregation.mode,
            lora=self.lora,
            train=self.round_train(round if progress is None else progress),
            payload_dtype=self.limits.payload_dtype,
            max_payload_bytes=self.limits.max_payload_bytes,
            adapter_seed=self.project.seed,
            downlink_dtype=self.round.downlink_dtype,
            base_version=base_version,
        )


def lr_factor_at(kind: str, n: int, total: int) -> float:
    """The factor on train.learning_rate in round (async: version) `n` of `total` (`[round] lr_schedule`):
    1 throughout for constant; for cosine `schedule.cosine` from round 1 to round `total`."""
    if kind == "constant" or total <= 1:
        return 1.0
    return schedule.cosine((n - 1) / (total - 1))


def _check_combinations(cfg: ProjectConfig) -> None:
    """Refuse settings that contradict each other or where a rule would silently do nothing
    (each robust rule checks its own settings: coordinator.rules)."""
    from loracommons.coordinator import rules  # rules builds on this module's ConfigError

    rnd, agg = cfg.round, cfg.aggregation
    low = rnd.min_volunteers
    if low > rnd.volunteers_per_round:
        raise config_error(
            "round", "min_volunteers", low, f"exceeds volunteers_per_round = {rnd.volunteers_per_round}"
        )
    if agg.exact_sketch_rank and agg.exact_sketch_rank < cfg.lora.r:
        raise config_error(
            "aggregation",
            "exact_sketch_rank",
            agg.exact_sketch_rank,
            f"must be 0 or at least lora r = {cfg.lora.r}",
        )
    if agg.server_lr != 1.0 and cfg.privacy.dp:
        raise config_error(
            "aggregation", "server_lr", agg.server_lr, "must be 1 with [privacy] dp: the noise is "
            "calibrated to the plain mean's sensitivity, which a server step would scale",
        )
    if rnd.lr_schedule != "constant" and rnd.rounds == 0:
        raise config_error(
            "round", "lr_schedule", rnd.lr_schedule, "needs [round] rounds > 0: a schedule over the project "
            "ends somewhere, and rounds = 0 runs until stopped",
        )
    rules.validate(cfg)
    if rnd.schedule == "async":
        _check_async(cfg)
    net = cfg.network
    ports = {
        "fleet_port": net.fleet_port,
        "http_port": net.http_port,
    }
    seen: dict[int, str] = {}
    for key, port in ports.items():
        if port in seen:
            raise config_error("network", key, port, f"already used by {seen[port]}")
        seen[port] = key


def staleness_factor(cfg: ProjectConfig, tau: int) -> float:
    """The factor on a stale update's weight (`[round] staleness_weight`); 1 for a fresh one."""
    kind = cfg.round.staleness_weight
    if kind == "constant":
        return 1.0
    return 1.0 / math.sqrt(1.0 + tau) if kind == "inverse_sqrt" else 1.0 / (1.0 + tau)


def _check_async(cfg: ProjectConfig) -> None:
    """Async refuses what it cannot do as documented (DESIGN: buffered asynchronous aggregation)."""
    rnd = cfg.round
    if cfg.aggregation.mode == "exact":
        raise config_error(
            "aggregation", "mode", "exact", "not with [round] schedule = 'async': a stale update's "
            "product delta B_i A_i - B_base A_base has rank 2r, so the rank-r fold is no longer exact; "
            "use ffa (exact there) or fedavg",
        )
    if cfg.privacy.dp:
        raise config_error(
            "privacy", "dp", True, "not with [round] schedule = 'async': the accountant counts sampled "
            "synchronous rounds, which a buffer of whoever answers first is not",
        )
    if rnd.min_volunteers > rnd.buffer_size:
        raise config_error(
            "round", "min_volunteers", rnd.min_volunteers,
            f"exceeds buffer_size = {rnd.buffer_size}: no version could ever be aggregated",
        )


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text) + '"'


def render_toml(cfg: ProjectConfig | None = None) -> str:
    """The whole configuration as TOML, every key preceded by its doc, unit and allowed values."""
    cfg = cfg or ProjectConfig()
    lines = [
        "# LoRA Commons project configuration. Every key is optional; shown values are this",
        "# project's settings (defaults where not given). Units in brackets.",
        "",
    ]
    for section, cls in SECTIONS.items():
        lines.append(f"[{section}]")
        for key, meta in key_info(cls).items():
            note = f"# {meta['doc']}"
            if meta.get("unit"):
                note += f" [{meta['unit']}]"
            if "choices" in meta:
                note += f" (one of: {', '.join(meta['choices'])})"
            note += f" (default {_toml_value(meta['default'])})"
            lines += [note, f"{key} = {_toml_value(getattr(getattr(cfg, section), key))}"]
        lines.append("")
    return "\n".join(lines)


def write_default_toml(path: str | Path, cfg: ProjectConfig | None = None) -> Path:
    """Write `render_toml(cfg)` to `path` (a file)."""
    path = Path(path)
    path.write_text(render_toml(cfg), encoding="utf-8")
    return path


def load_config(directory: str | Path) -> ProjectConfig:
    """Read and validate `DIR/project.toml`."""
    path = Path(directory) / CONFIG_FILE
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        obj = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return ProjectConfig.from_dict(obj)


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:48] or "project"


OPEN_MAX_EXAMPLES_WEIGHT = 256
"""init's weight cap for an open project: a claim of 10,000 examples counts as 256 at most."""


def _open_project_defaults(obj: dict[str, dict[str, Any]]) -> None:
    """Where the caller did not choose: an open project bounds each update (median clipping, unless
    dp clips, or min_volunteers = 1 leaves no median) and caps the weight of claimed examples."""
    agg = obj["aggregation"]
    agg.setdefault("max_examples_weight", OPEN_MAX_EXAMPLES_WEIGHT)
    low = obj.get("round", {}).get("min_volunteers", RoundSection.min_volunteers)
    if "clip" not in agg and not obj.get("privacy", {}).get("dp", False) and low >= 2:
        agg["clip"] = "median"


INIT_SCHEDULE: dict[str, dict[str, Any]] = {"train": {"max_steps": 10, "warmup_steps": 5}}
"""What `init` writes unless told otherwise: sync every 10 local steps (the demo's measured best: rounds
are cheap enough, and longer rounds drift apart on non-IID data). A project given a number of rounds also
gets `[round] lr_schedule = "cosine"` (demo's setting, 90 x 10, in process: 96/96/96% exact match against
84/98/92% with a constant rate; bench/README.md; the key's doc has the other measurements); an open-ended
one (rounds = 0) keeps the constant rate."""


def init_project(
    directory: str | Path,
    base_model: str,
    name: str | None = None,
    mode: str = "ffa",
    membership: str = "open",
    revision: str | None = None,
    **overrides: dict[str, Any],
) -> ProjectConfig:
    """Create a project folder: `project.toml` (documented) and the coordinator release key.

    `overrides` maps a section to key values, e.g. `round={"min_volunteers": 1}`. An open project
    gets protective defaults for the keys not given (`_open_project_defaults`; what is in force:
    `rules.protections`).
    Refuses a folder that already holds a project.
    """
    directory = Path(directory)
    if (directory / CONFIG_FILE).exists() or (directory / RELEASE_KEY).exists():
        raise ConfigError(f"{directory} already holds a project; refusing to overwrite it")
    name = name or f"{Path(base_model.rstrip('/')).name or base_model} community adapter"
    obj: dict[str, dict[str, Any]] = {section: dict(values) for section, values in INIT_SCHEDULE.items()}
    for section, values in overrides.items():
        obj[section] = {**obj.get(section, {}), **values}
    if obj.get("round", {}).get("rounds") and "lr_schedule" not in obj["round"]:
        obj["round"]["lr_schedule"] = "cosine"  # a project with an end anneals towards it (INIT_SCHEDULE)
    project = {
        "id": f"{_slug(name)}-{secrets.token_hex(4)}",
        "name": name,
        "base_model": base_model,
        "base_model_revision": revision or "main",
        "membership": membership,
    }
    obj["project"] = {**project, **obj.get("project", {})}
    obj["aggregation"] = {"mode": mode, **obj.get("aggregation", {})}
    if obj["project"]["membership"] == "open":
        _open_project_defaults(obj)
    cfg = ProjectConfig.from_dict(obj)
    directory.mkdir(parents=True, exist_ok=True)
    SigningKey.generate("coordinator").save(directory / RELEASE_KEY)
    tmp = directory / (CONFIG_FILE + ".tmp")
    write_default_toml(tmp, cfg)
    tmp.replace(directory / CONFIG_FILE)
    return cfg
