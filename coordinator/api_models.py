"""The JSON bodies of the coordinator's HTTP API (pydantic: they also make the OpenAPI schema)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ProjectOut(BaseModel):
    id: str
    name: str
    base_model: str
    base_model_revision: str = ""
    mode: str | None = None
    membership: str | None = None
    public_key: str | None = None  # the coordinator's release key, OpenSSH
    fingerprint: str | None = None  # of that key: what downloaders pin
    fleet_address: str | None = None
    latest_version: int | None = None


class ReleaseOut(BaseModel):
    version: int
    round: int
    created: str
    manifest_digest: str
    metrics: dict[str, Any]


class ReleaseDocument(BaseModel):
    """`release.json`: the canonical manifest text and its base64 Ed25519 signature."""

    manifest: str
    signature: str


class RoundOut(BaseModel):
    round: int
    status: str
    started: str
    closed: str | None
    base_version: int
    sampled: int
    admitted: int
    rejected: int
    train_loss: float | None
    eval_loss: float | None
    note: str


class VolunteerOut(BaseModel):
    fingerprint: str  # short display form of the key's fingerprint
    display_name: str | None
    rounds_contributed: int
    examples_contributed: int


class Health(BaseModel):
    status: str
