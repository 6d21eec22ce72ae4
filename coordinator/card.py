"""The model card (`README.md`) of a release, ready for the Hugging Face Hub.

The card opens with the Hub's YAML front matter (library_name, base_model, license, tags and,
when volunteers reported a federated evaluation, a `model-index` result), then says how the
adapter was trained (rounds, volunteers, mode, robust rules, differential privacy), how to
verify it and how to load it. Publishing to the Hub stays the operator's step:

    huggingface-cli upload ORG/NAME DIR/releases/v3 .

YAML values are written as JSON strings and numbers, which YAML reads unchanged, so a project
name with a colon or a quote cannot break the front matter.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from loracommons.coordinator.config import AggregationSection, PrivacySection, ProjectConfig, ProjectSection
from loracommons.coordinator.rows import RoundRow
from loracommons.protocol import modes
from loracommons.protocol.identity import PublicKey, fingerprint_display
from loracommons.protocol.lora import DEMO_MODEL_ID
from loracommons.protocol.release import MANIFEST_FILE

TAGS = ("lora", "federated-learning", "peft", "loracommons")
#: What the federated evaluation measures, as the card and the model-index name it.
EVAL_DATASET = "volunteers' held-out splits (federated)"
EVAL_DATASET_TYPE = "federated-held-out"


@dataclass(frozen=True)
class CardFacts:
    """Everything the card states about one release."""

    project: ProjectSection
    version: int
    round: int
    metrics: Mapping[str, Any]  # the release manifest's metrics
    contributors: Mapping[str, int]  # fingerprint -> examples, for this release
    signer: PublicKey
    previous: str  # digest of the previous release manifest, "" for v1
    history: Sequence[RoundRow] = ()  # the rounds up to `round`, oldest first
    volunteers: int = 0  # keys with an admitted update in an aggregated round so far
    config: ProjectConfig | None = None  # mode, rules and privacy; None states none of them


def model_card(facts: CardFacts) -> str:
    return "\n".join([*front_matter(facts), *_intro(facts), *_training(facts), *_evaluation(facts),
                      *_contributors(facts), *_verify_and_load(facts)])


def _evaluated(history: Sequence[RoundRow]) -> list[RoundRow]:
    return [r for r in history if r.eval_loss is not None]


def _scored_versions(metrics: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The release metrics' `eval_by_version` (coordinator/publishing.py), oldest version first."""
    rows = metrics.get("eval_by_version")
    if not isinstance(rows, list):
        return []
    return [r for r in rows if isinstance(r, Mapping) and {"version", "round", "eval_loss"} <= set(r)]


def front_matter(facts: CardFacts) -> list[str]:
    p = facts.project
    lines = ["---", "library_name: peft", f"base_model: {json.dumps(p.base_model)}",
             f"license: {json.dumps(p.license)}", "pipeline_tag: text-generation", "tags:"]
    lines += [f"- {tag}" for tag in TAGS]
    figure = _headline_eval(facts)
    if figure is not None:
        name, value = figure
        lines += [
            "model-index:",
            f"- name: {json.dumps(f'{p.name or p.id} v{facts.version}')}",
            "  results:",
            "  - task:",
            "      type: text-generation",
            "    dataset:",
            f"      name: {json.dumps(EVAL_DATASET)}",
            f"      type: {EVAL_DATASET_TYPE}",
            "    metrics:",
            "    - type: loss",
            f"      value: {json.dumps(round(value, 6))}",
            f"      name: {json.dumps(name)}",
        ]
    return [*lines, "---", ""]


def _headline_eval(facts: CardFacts) -> tuple[str, float] | None:
    """The model-index figure: the latest scored version's federated loss, with what it measured."""
    scored = _scored_versions(facts.metrics)
    if scored:
        last = scored[-1]
        return (f"held-out loss of v{last['version']} (scored in round {last['round']})",
                float(last["eval_loss"]))
    evaluated = _evaluated(facts.history)
    if evaluated:
        row = evaluated[-1]
        return (f"held-out loss of the adapter that round {row.round} started from (v{row.base_version})",
                float(row.eval_loss or 0.0))
    return None


def _intro(facts: CardFacts) -> list[str]:
    p = facts.project
    return [
        f"# {p.name or p.id}: community LoRA adapter v{facts.version}",
        "",
        "A LoRA adapter trained by a community of volunteers with LoRA Commons: each volunteer",
        "trained on private data and sent only signed low-rank updates; the coordinator",
        "checked every update, aggregated the admitted ones and signed this release.",
        "",
        f"- Base model: `{p.base_model}` (revision `{p.base_model_revision}`)",
        f"- Version: {facts.version} (after round {facts.round})",
        f"- Contributors to this release: {len(facts.contributors)}",
        f"- Coordinator key: `{facts.signer.fingerprint}`",
        f"- Previous release manifest: `{facts.previous or '(none: first release)'}`",
        "",
    ]


def _training(facts: CardFacts) -> list[str]:
    aggregated = sum(r.status == "aggregated" for r in facts.history)
    lines = ["## How it was trained", "",
             f"- Rounds: {len(facts.history)} run, {aggregated} aggregated (through round {facts.round})",
             f"- Volunteers with an admitted update so far: {facts.volunteers}"]
    cfg = facts.config
    if cfg is not None:
        mode = modes.get(cfg.aggregation.mode)
        lines += [f"- Aggregation mode: `{mode.name}`: {mode.doc}",
                  f"- Robust rules: {robust_rules(cfg.aggregation)}",
                  f"- Differential privacy: {_privacy(cfg.privacy, facts.metrics)}",
                  f"- LoRA: rank {cfg.lora.r}, alpha {cfg.lora.alpha}, "
                  f"targets {', '.join(cfg.lora.target_modules)}"]
    elif "dp_epsilon" in facts.metrics:
        lines.append(f"- Differential privacy: epsilon {facts.metrics['dp_epsilon']}")
    if facts.metrics:
        lines += ["", "Release metrics (also in the signed `release.json`):", "",
                  "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(facts.metrics.items())
                  if not isinstance(v, (list, dict))]  # eval_by_version has its own table below
    return [*lines, ""]


def robust_rules(agg: AggregationSection) -> str:
    """The active robustness rules in words, or "none"."""
    rules = []
    if agg.clip != "none":
        rules.append(f"clip deltas above {agg.clip_factor:g} x the round's median norm")
    if agg.robust == "trimmed_mean":
        rules.append(f"coordinate-wise trimmed mean (drop {agg.trim_fraction:g} at each end)")
    elif agg.robust == "krum":
        rules.append(f"Multi-Krum (f = {agg.krum_f})")
    if agg.free_rider_ratio > 0:
        rules.append(f"reject deltas under {agg.free_rider_ratio:g} x the median norm")
    if agg.max_norm > 0:
        rules.append(f"reject deltas with norm above {agg.max_norm:g}")
    rules.append(f"an update's weight is capped at {agg.max_examples_weight} examples")
    return "; ".join(rules)


def _privacy(dp: PrivacySection, metrics: Mapping[str, Any]) -> str:
    if not dp.dp:
        return "off"
    spent = metrics.get("dp_epsilon")
    epsilon = f"epsilon {spent} spent" if spent is not None else "epsilon not reported"
    return (f"central Gaussian, clip norm {dp.clip_norm:g}, noise multiplier {dp.noise_multiplier:g}: "
            f"({epsilon}, delta {dp.delta:g})")


def _evaluation(facts: CardFacts) -> list[str]:
    evaluated = _evaluated(facts.history)
    if not evaluated:
        return ["## Evaluation", "", "No federated evaluation was reported for these rounds; the release",
                "metrics above hold the volunteers' training loss.", ""]
    lines = ["## Evaluation", "",
             "Federated evaluation: before training, each sampled volunteer scored the global adapter it",
             "received on its own held-out split; the coordinator recorded a robust median per round,",
             "so no single volunteer can move the figure. Lower is better.", ""]
    scored = _scored_versions(facts.metrics)
    if scored:
        lines += ["Per version (also `eval_by_version` in the signed `release.json`):", "",
                  "| version | scored in round | held-out loss |", "| --- | --- | --- |"]
        lines += [f"| v{v['version']} | {v['round']} | {_fmt(float(v['eval_loss']))} |" for v in scored]
        lines += ["", f"v{facts.version} itself is scored by the volunteers of the next round: its figure",
                  "comes with the next release and on the coordinator's dashboard.", "", "Per round:", ""]
    lines += ["| round | adapter evaluated | held-out loss | train loss |", "| --- | --- | --- | --- |"]
    lines += [f"| {r.round} | v{r.base_version} | {_fmt(r.eval_loss)} | {_fmt(r.train_loss)} |"
              for r in evaluated]
    return [*lines, ""]


def _contributors(facts: CardFacts) -> list[str]:
    top = sorted(facts.contributors.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    if not top:
        return []
    lines = ["## Top contributors", "", "| volunteer | examples |", "| --- | --- |"]
    lines += [f"| `{fingerprint_display(fp)}` | {ex} |" for fp, ex in top]
    return [*lines, ""]


def _verify_and_load(facts: CardFacts) -> list[str]:
    fingerprint, version = facts.signer.fingerprint, facts.version
    return [
        "## Download and verify",
        "",
        f"`{MANIFEST_FILE}` beside this card lists every file's size and sha256 and is signed by",
        "the coordinator key above; its manifest also holds the digest of the previous release.",
        "`--pin` refuses any release not signed by that key, or whose chain or files do not check.",
        "",
        "```",
        f"loracommons download http://HOST:PORT --out adapter --version {version} --pin {fingerprint}",
        "```",
        "",
        "## Load",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        *_load_base_lines(facts.project.base_model),
        'model = PeftModel.from_pretrained(base, "adapter")',
        "```",
        "",
    ]


def _load_base_lines(base: str) -> list[str]:
    if base == DEMO_MODEL_ID:  # shipped inside the loracommons package, not on a hub
        return ["from loracommons.demo import base_model_path", "",
                "base = AutoModelForCausalLM.from_pretrained(base_model_path())"]
    return [f"base = AutoModelForCausalLM.from_pretrained({json.dumps(base)})"]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
