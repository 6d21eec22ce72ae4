"""compose.yaml run as local processes on 127.0.0.1: one round completes, release v1 is published.

No Docker engine runs here, so this test does what the engine would with the
files, as far as the wiring goes: it reads `docker/compose.yaml` (interpolated
from environment variables, as Compose does) and each service's Dockerfile
(ENV, ENTRYPOINT, CMD, EXPOSE, COPY of the entrypoint scripts, WORKDIR), then
starts every service's entrypoint + command as a local process, in the order
`depends_on` asks (`service_completed_successfully`: the job ran and exited 0;
`service_healthy`: the service's own healthcheck command passed). The mapping
from container to host:

- volumes (named or bind) -> folders under the test's temp folder; any other
  absolute path -> the service's own "root filesystem" folder there
  (COPY'd scripts are linked into it: /usr/local/bin/...);
- every container port (EXPOSE, `ports`) -> a free port on 127.0.0.1, and
  `service:port` -> 127.0.0.1:that port; 0.0.0.0 -> 127.0.0.1;
- /opt/venv/bin (the images' virtualenv) -> this test's virtualenv;
- the environment is the image's ENV plus the service's `environment` only
  (HOME in the service's root folder), nothing from the test process but the
  offline switches.

The base model is the embedded demo model (`loracommons/demo-tiny`, compose's
default) once it is built; until then a tiny model, mounted into every service
at /models as an operator would mount a local model.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from loracommons.protocol import processes
from tests.docker import COMPOSE, DOCKER, ROOT, Stage, load_compose, parse_dockerfile
from tests.e2e.procs import Processes, free_port, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

VENV_BIN = Path(sys.executable).parent
IMAGE_VENV_BIN = "/opt/venv/bin"

# Compose variables for a quick community: one round of a few steps on small data.
FAST = {
    "LC_ROUNDS": "1",
    "LC_MAX_STEPS": "4",
    "LC_BATCH_SIZE": "4",
    "LC_SEQ_LEN": "64",
    "LC_LEARNING_RATE": "0.01",
    "LC_LORA_R": "4",
    "LC_LORA_ALPHA": "8.0",
    "LC_ROUND_TIMEOUT_S": "120",
    "LC_DEMO_EXAMPLES": "48",
}
# What the test process passes on: offline hub switches, and one thread per process
# (this machine has 2 cores for a coordinator, two volunteers and their SuperNodes).
PASSED_ON = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
             "OMP_NUM_THREADS": "1", "LANG": "C.UTF-8"}


@dataclass
class Service:
    name: str
    spec: dict
    stage: Stage
    root: Path
    """This service's 'root filesystem' for paths that are not volumes."""
    mounts: list[tuple[str, Path]] = field(default_factory=list)
    ports: dict[int, int] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    def path(self, container_path: str) -> Path:
        inside = [m for m in self.mounts if container_path == m[0] or container_path.startswith(m[0] + "/")]
        best = max(inside, key=lambda m: len(m[0]), default=None)
        if best is None:
            return self.root / container_path.lstrip("/")
        return best[1] / container_path[len(best[0]):].lstrip("/")

    def search_path(self) -> str:
        return os.pathsep.join([str(VENV_BIN), str(self.path("/usr/local/bin")), "/usr/bin", "/bin"])


class Community:
    """The compose file's services as local processes."""

    def __init__(self, compose: dict, workdir: Path, procs: Processes):
        self.workdir = workdir
        self.procs = procs
        self.services: dict[str, Service] = {}
        for name, spec in compose["services"].items():
            dockerfile = (COMPOSE.parent / spec["build"]["context"] / spec["build"]["dockerfile"]).resolve()
            stage = parse_dockerfile(dockerfile)[-1]
            svc = Service(name, spec, stage, workdir / "services" / name)
            context = (COMPOSE.parent / spec["build"]["context"]).resolve()
            for volume in spec.get("volumes", []):
                source, target = volume.split(":")[:2]
                if source.startswith((".", "/", "~")):
                    host = (COMPOSE.parent / Path(source).expanduser()).resolve()
                else:
                    host = workdir / "volumes" / source
                host.mkdir(parents=True, exist_ok=True)
                svc.mounts.append((target, host))
            container_ports = set(stage.expose)
            for mapping in spec.get("ports", []):
                container_ports.add(int(str(mapping).split(":")[-1].split("/")[0]))
            container_ports.update(int(p) for p in spec.get("expose", []))
            svc.ports = {port: free_port() for port in sorted(container_ports)}
            for sources, dest in stage.copies:  # the image's files, linked from the build context
                for source in sources:
                    target = svc.path(dest + Path(source).name if dest.endswith("/") else dest)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.symlink_to(context / source)
            svc.path(stage.workdir).mkdir(parents=True, exist_ok=True)
            self.services[name] = svc

    def value(self, svc: Service, text: str) -> str:
        """A container-side string (argument or environment value) as seen on this host."""
        if text.startswith("--") and "=" in text:
            option, _, rest = text.partition("=")
            return f"{option}={self.value(svc, rest)}"
        if text == "0.0.0.0":
            return "127.0.0.1"
        match = re.fullmatch(r"([A-Za-z][\w.-]*):(\d+)", text)
        if match and match.group(1) in self.services:
            return f"127.0.0.1:{self.services[match.group(1)].ports[int(match.group(2))]}"
        if text.isdigit() and int(text) in svc.ports:
            return str(svc.ports[int(text)])
        if text.startswith("/"):
            return str(svc.path(text))
        return text

    def environment(self, svc: Service) -> dict[str, str]:
        env = {**PASSED_ON, "PATH": svc.search_path(), "HOME": str(svc.path(svc.stage.workdir))}
        declared = svc.spec.get("environment", {})
        if isinstance(declared, list):
            declared = dict(item.partition("=")[::2] for item in declared)
        for key, value in {**svc.stage.env, **declared}.items():
            if key != "PATH":
                env[key] = self.value(svc, "" if value is None else str(value))
        return env

    def argv(self, svc: Service, words: list[str]) -> list[str]:
        argv = [self.value(svc, w) for w in words]
        found = shutil.which(argv[0], path=svc.search_path())
        assert found, f"{svc.name}: {words[0]!r} is not on the image's PATH"
        return [found, *argv[1:]]

    def start(self, name: str) -> subprocess.Popen:
        svc = self.services[name]
        entrypoint = svc.spec.get("entrypoint", svc.stage.entrypoint)
        command = svc.spec.get("command", [] if "entrypoint" in svc.spec else svc.stage.cmd)
        argv = self.argv(svc, [*entrypoint, *command])
        svc.proc = processes.start(argv, self.workdir / f"{name}.log", env=self.environment(svc),
                                   cwd=svc.path(svc.stage.workdir))
        self.procs.procs.append(svc.proc)
        return svc.proc

    def healthy(self, name: str) -> bool:
        svc = self.services[name]
        test = svc.spec["healthcheck"]["test"]
        words = test[1:] if test[0] == "CMD" else ["/bin/sh", "-c", test[1]]
        result = subprocess.run(self.argv(svc, words), env=self.environment(svc), capture_output=True,
                                timeout=30, cwd=svc.path(svc.stage.workdir))
        return result.returncode == 0

    def satisfy(self, dependency: str, condition: str) -> None:
        proc = self.services[dependency].proc
        assert proc is not None, f"{dependency} was not started before its dependents"
        if condition == "service_completed_successfully":
            wait_for(lambda: proc.poll() is not None, 120, f"{dependency} to finish")
            assert proc.returncode == 0, self.log(dependency)
        elif condition == "service_healthy":
            wait_for(lambda: self.healthy(dependency), 180, f"{dependency} to be healthy", interval=2,
                     procs=[proc])

    def up(self) -> None:
        """Start every service after its dependencies, as `docker compose up` would."""
        started: set[str] = set()

        def visit(name: str) -> None:
            if name in started:
                return
            depends = self.services[name].spec.get("depends_on", {})
            if isinstance(depends, list):
                depends = {d: {"condition": "service_started"} for d in depends}
            for dependency, how in depends.items():
                visit(dependency)
                self.satisfy(dependency, how.get("condition", "service_started"))
            self.start(name)
            started.add(name)

        for name in self.services:
            visit(name)

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def kill_leftovers(marker: str) -> None:
    """SIGKILL any process still running from our temp folder (a SuperNode orphaned by a crash)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def demo_base_built() -> bool:
    from loracommons.demo import base_model_path

    return (base_model_path() / "config.json").exists()


def write_certificates(certs: Path, ca_only: Path) -> None:
    """A CA and a server certificate for the names the services use, as docker/README.md makes them."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "LoRA Commons test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    names = [x509.DNSName("coordinator"), x509.DNSName("localhost"),
             x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "coordinator")]))
              .issuer_name(ca_name).public_key(server_key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.SubjectAlternativeName(names), critical=False)
              .sign(ca_key, hashes.SHA256()))
    for folder in (certs, ca_only):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (certs / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (certs / "server.key").write_bytes(server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


@pytest.mark.parametrize("transport", ["insecure", "tls"])
def test_compose_services_run_one_round_and_publish_v1(tmp_path, transport):
    """`docker compose up` with the defaults (insecure local community), and with TLS as the README says."""
    from loracommons.protocol import PublicKey, SignedRelease, verify_chain

    variables = dict(FAST)
    if transport == "tls":  # docker/README.md, "TLS certificates"
        write_certificates(tmp_path / "certs", tmp_path / "ca")
        variables.update(LC_TLS="1", LC_INSECURE="0", LC_CERTS_DIR=str(tmp_path / "certs"),
                         LC_CA_DIR=str(tmp_path / "ca"),
                         LC_VOLUNTEER_TLS="--root-certificates=/certs/ca.pem")
    models = None
    if not demo_base_built():
        from tests.client import build_tiny_model

        models = build_tiny_model(tmp_path / "models" / "tiny").parent
        variables["LC_BASE_MODEL"] = "/models/tiny"
    compose = load_compose(env=variables)
    if models is not None:  # as an operator mounts a local base model into every service
        for spec in compose["services"].values():
            spec.setdefault("volumes", []).append(f"{models}:/models:ro")
    procs = Processes(tmp_path)
    community = Community(compose, tmp_path, procs)
    coordinator = community.services["coordinator"]
    project = coordinator.path(coordinator.stage.env["LC_PROJECT_DIR"])
    procs.pid_files.append(project / "flower" / "superlink.pid")
    try:
        community.up()
        wait_for(lambda: coordinator.proc.poll() is not None, 240, "round 1 and release v1",
                 procs=[s.proc for s in community.services.values() if s.name.startswith("volunteer")])
        assert coordinator.proc.returncode == 0, community.log("coordinator")
        log = community.log("coordinator")
        assert "coordinator ready" in log, log
        assert ("(TLS)" if transport == "tls" else "(INSECURE") in log, log
        # the project the entrypoint created from the environment
        toml = (project / "project.toml").read_text()
        for line in ("rounds = 1", "max_steps = 4", "volunteers_per_round = 2", "min_volunteers = 2",
                     "r = 4"):
            assert f"\n{line}\n" in toml, line
        # release v1, signed by the project's key, for round 1
        pinned = PublicKey.load(project / "keys" / "release_key.pub")
        release = SignedRelease.from_json((project / "releases" / "v1" / "release.json").read_bytes())
        (manifest,) = verify_chain([release], pinned)
        assert (manifest.version, manifest.round) == (1, 1)
        # each volunteer: its own demo data in its own volume, its identity kept in its volume
        for name in ("volunteer1", "volunteer2"):
            volunteer = community.services[name]
            assert (volunteer.path("/data") / "train.jsonl").stat().st_size > 0
            key = volunteer.path("/identity") / "id_ecdsa"
            assert key.exists() and key.stat().st_mode & 0o077 == 0, community.log(name)
            assert "update sent" in community.log(name), community.log(name)
        data1, data2 = (community.services[n].path("/data/train.jsonl").read_text()
                        for n in ("volunteer1", "volunteer2"))
        assert data1 != data2  # non-IID shares, one per volunteer
    finally:
        procs.stop_all()
        kill_leftovers(str(tmp_path))


def test_scripts_copied_into_the_images_are_executable():
    for dockerfile in (DOCKER / "coordinator.Dockerfile", DOCKER / "volunteer.Dockerfile"):
        for sources, _ in parse_dockerfile(dockerfile)[-1].copies:
            for source in sources:
                path = ROOT / source
                assert path.exists(), f"{dockerfile.name}: COPY {source}: missing"
                if path.suffix == ".sh":
                    assert os.access(path, os.X_OK), f"{source} must be executable (chmod +x)"
                    assert path.read_text().startswith("#!/bin/sh\n"), f"{source}: needs #!/bin/sh"
