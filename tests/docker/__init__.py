"""Tests of docker/: the images and the compose file, proven without a Docker engine.

Helpers shared by the tests: a reader of the Dockerfile instructions that matter
at run time (ENV, ENTRYPOINT, CMD, EXPOSE, COPY, USER, VOLUME, HEALTHCHECK,
WORKDIR, per build stage) and of `compose.yaml` (Compose's `${VAR}`,
`${VAR:-default}` and `${VAR-default}` interpolation, `!reset` tags).
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_CPU = DOCKER / "compose.cpu.yaml"
DOCKERFILES = (DOCKER / "coordinator.Dockerfile", DOCKER / "volunteer.Dockerfile")


@dataclass
class Stage:
    """The run-time relevant instructions of one build stage (inherited ones included)."""

    base: str
    name: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    expose: list[int] = field(default_factory=list)
    copies: list[tuple[list[str], str]] = field(default_factory=list)
    """(sources relative to the build context, destination) of COPY without --from."""
    user: str = "root"
    volumes: list[str] = field(default_factory=list)
    healthcheck: str | None = None
    workdir: str = "/"


def instructions(path: Path) -> list[tuple[int, str, str]]:
    """(line number, INSTRUCTION, arguments) with line continuations joined, comments dropped."""
    out, buf, start = [], "", 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not buf:
            start = number
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((start, word.upper(), rest.strip()))
        buf = ""
    return out


def _exec_form(args: str) -> list[str]:
    if args.startswith("["):
        return json.loads(args)
    return ["/bin/sh", "-c", args]


def parse_dockerfile(path: Path, build_args: dict[str, str] | None = None) -> list[Stage]:
    """Every stage of a Dockerfile; `FROM <earlier stage>` inherits that stage's settings."""
    args = dict(build_args or {})
    stages: list[Stage] = []
    for _, word, rest in instructions(path):
        if word == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args.setdefault(name, default)
            continue
        if word == "FROM":
            parts = rest.split()
            image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), parts[0])
            name = parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else None
            parent = next((s for s in stages if s.name == image), None)
            stage = Stage(base=image, name=name)
            if parent is not None:
                stage = Stage(base=parent.base, name=name, env=dict(parent.env),
                              entrypoint=list(parent.entrypoint), cmd=list(parent.cmd),
                              expose=list(parent.expose), copies=list(parent.copies), user=parent.user,
                              volumes=list(parent.volumes), healthcheck=parent.healthcheck,
                              workdir=parent.workdir)
            stages.append(stage)
            continue
        stage = stages[-1]
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                stage.env[key] = value
        elif word == "ENTRYPOINT":
            stage.entrypoint, stage.cmd = _exec_form(rest), []
        elif word == "CMD":
            stage.cmd = _exec_form(rest)
        elif word == "EXPOSE":
            stage.expose += [int(p.split("/")[0]) for p in rest.split()]
        elif word == "COPY" and "--from=" not in rest:
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            stage.copies.append((parts[:-1], parts[-1]))
        elif word == "USER":
            stage.user = rest
        elif word == "VOLUME":
            stage.volumes += json.loads(rest) if rest.startswith("[") else rest.split()
        elif word == "HEALTHCHECK":
            stage.healthcheck = rest
        elif word == "WORKDIR":
            stage.workdir = rest if rest.startswith("/") else f"{stage.workdir.rstrip('/')}/{rest}"
    return stages


_VAR = re.compile(r"\$\$|\$\{(\w+)(?:(:?-)([^}]*))?\}|\$(\w+)")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's variable substitution (the forms compose.yaml uses)."""

    def sub(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        op, default = match.group(2), match.group(3) or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        return env.get(name, "")

    return _VAR.sub(sub, value)


def interpolate_all(obj, env: dict[str, str]):  # noqa: ANN001, ANN201
    if isinstance(obj, str):
        return interpolate(obj, env)
    if isinstance(obj, list):
        return [interpolate_all(v, env) for v in obj]
    if isinstance(obj, dict):
        return {k: interpolate_all(v, env) for k, v in obj.items()}
    return obj


class Reset:
    """A Compose `!reset` tag (an override that removes a setting)."""


def load_compose(path: Path = COMPOSE, env: dict[str, str] | None = None) -> dict:
    """The compose file as data, interpolated with `env` (Compose reads the shell's environment)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!reset", lambda loader, node: Reset())
    data = yaml.load(path.read_text(), Loader=Loader)  # noqa: S506 (a SafeLoader subclass)
    return interpolate_all(data, env or {})
