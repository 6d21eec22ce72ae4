"""A small community of real processes on one machine, for the security and fault suites.

    community = Community(tmp_path)                       # a `Processes` with a few more starters
    project = make_project(tmp_path, base, round={...})   # `coordinator init` + settings
    coordinator = community.coordinator(project, port, http_port, wait_nodes=9)
    community.join(port, data, identity, "honest0")                    # the real `loracommons join`
    community.hostile("forged_signature", port, data, identity, "h1")  # the real client, one thing changed
    ...
    info = status(project)                  # `coordinator status --json` (tests.e2e.procs)

Processes are the real CLI entry points; the two launchers next to this file
(`hostile_node.py`, `coordinator_launcher.py`) patch one function and then call
the same CLI. Every process is started in its own session and stopped by pid.
Measured outcomes are merged into `test-artifacts/security-suite.json`, from
which SECURITY.md's table is filled in.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import ipaddress
import json
import sys
from pathlib import Path

from loracommons.protocol import PublicKey
from tests.e2e.procs import LC, Processes, cli

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
HOSTILE = HERE / "hostile_node.py"
LAUNCHER = HERE / "coordinator_launcher.py"
RESULTS = ROOT / "test-artifacts" / "security-suite.json"

#: Rounds of a few seconds on 2 CPU cores: 8 steps of batch 8 on a 2-layer, 32-wide Llama. The learning
#: rate is high enough that two rounds take the held-out loss about a third below the base model's, so
#: "within 10% of the all-honest run" is a bound an unprotected attack would break.
FAST = {
    "train": {"max_steps": 8, "batch_size": 8, "seq_len": 64, "learning_rate": 0.05, "warmup_steps": 1},
    "lora": {"r": 4, "alpha": 8.0},
}


class Community(Processes):
    """`Processes` plus the coordinator launcher, TLS and hostile nodes."""

    def coordinator(self, project: Path, port: int, http_port: int, log: str = "coordinator.log",
                    *, host: str = "127.0.0.1", tls: tuple[Path, Path, Path] | None = None,
                    wait_nodes: int = 0, publish_delay: float = 0.0, admit_delay: float = 0.0):
        """`coordinator start`; `wait_nodes` holds each round until that many nodes are connected."""
        self.pid_files.append(project / "flower" / "superlink.pid")
        security = (["--ssl-ca-certfile", str(tls[0]), "--ssl-certfile", str(tls[1]),
                     "--ssl-keyfile", str(tls[2])] if tls else ["--insecure"])
        args = ["coordinator", "start", str(project), "--host", host, "--port", str(port),
                "--http-host", "127.0.0.1", "--http-port", str(http_port), "--plain", *security]
        env = {"LC_TEST_WAIT_NODES": str(wait_nodes), "LC_TEST_PUBLISH_DELAY": str(publish_delay),
               "LC_TEST_ADMIT_DELAY": str(admit_delay)}
        plain = not (wait_nodes or publish_delay or admit_delay)
        command = [*LC, *args] if plain else [sys.executable, str(LAUNCHER), *args]
        return self.start(command, log, env=env)

    def node(self, mode: str | None, address: str, data: Path, identity: Path, name: str, *,
             ca: Path | None = None, env: dict | None = None, prefix: list[str] | None = None,
             extra: list[str] | None = None):
        """`loracommons join` (mode None) or a hostile node in `mode`, as `name`."""
        home = self.workdir / f"flwr-{name}"
        status_file = self.workdir / f"{name}.json"
        security = ["--root-certificates", str(ca)] if ca else ["--insecure"]
        args = ["join", address, "--data", str(data), "--identity", str(identity), "--threads", "1",
                "--status-file", str(status_file), *security, *(extra or [])]
        command = [*LC, *args] if mode is None else [sys.executable, str(HOSTILE), mode, *args]
        return self.start([*(prefix or []), *command], f"{name}.log",
                          env={"FLWR_HOME": str(home), **(env or {})})


def make_project(folder: Path, base: Path, membership: str = "open", **settings: dict) -> Path:
    """`coordinator init` through the CLI, then settings written into project.toml."""
    import tomllib

    from loracommons.coordinator.config import ProjectConfig, write_default_toml

    project = folder / "project"
    cli("coordinator", "init", str(project), "--base-model", str(base), "--name", "security test",
        "--membership", membership)
    obj = tomllib.loads((project / "project.toml").read_text())
    for section, values in {**FAST, **settings}.items():
        obj.setdefault(section, {}).update(values)
    write_default_toml(project / "project.toml", ProjectConfig.from_dict(obj))
    return project


def register(project: Path, identity: Path) -> None:
    """What `coordinator register DIR KEY.pub` does, in-process (one CLI start per key is slow)."""
    from loracommons.coordinator.store import Store

    store = Store(project)
    try:
        store.register_volunteer(PublicKey.load(str(identity) + ".pub"))
    finally:
        store.close()


def identity(path: Path) -> Path:
    """A volunteer key at `path` (kept if it exists: the same key gives the same training seed)."""
    from loracommons.protocol import SigningKey

    if not path.exists():
        SigningKey.generate("volunteer").save(path)
    return path


def fingerprint(identity_path: Path) -> str:
    return PublicKey.load(str(identity_path) + ".pub").fingerprint


def torn_blobs(project: Path) -> list[str]:
    """Blob files whose bytes do not hash to their name (temporary files are not blobs)."""
    bad = []
    for path in sorted((project / "blobs" / "sha256").iterdir()):
        if path.name.startswith(".tmp-"):
            continue
        if hashlib.sha256(path.read_bytes()).hexdigest() != path.name:
            bad.append(path.name)
    return bad


def heldout_loss(base: Path, adapter: Path | None, records: list[dict]) -> float:
    """Mean response-token loss of `records` under the base model (+ adapter), on CPU."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loracommons.client.evaluate import heldout_loss as loss_of

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    return loss_of(model, tokenizer, records, 64)


def latest_release_dir(project: Path) -> Path:
    versions = sorted(int(p.name[1:]) for p in (project / "releases").glob("v*"))
    return project / "releases" / f"v{versions[-1]}"


def tls_files(folder: Path, ips: tuple[str, ...] = ("127.0.0.1",)) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for `ips`: (ca.pem, server.pem, server.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)

    def build(subject: str, key, issuer: str, signer, ca: bool, sans=None):  # noqa: ANN001, ANN202
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = build("loracommons test CA", ca_key, "loracommons test CA", ca_key, True)
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips] + [x509.DNSName("localhost")]
    cert = build("loracommons test coordinator", key, "loracommons test CA", ca_key, False, sans)
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    paths[2].chmod(0o600)
    return paths


def record_result(section: str, name: str, result: dict) -> None:
    """Merge one measured outcome into test-artifacts/security-suite.json (for SECURITY.md)."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = json.loads(RESULTS.read_text())
        except (OSError, ValueError):
            data = {}
        when = dt.datetime.now().isoformat(timespec="seconds")
        data.setdefault(section, {})[name] = {**result, "measured": when}
        RESULTS.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
