"""Shared setup of the fault suite (the same tiny base and volunteers as the security suite)."""

from tests.security.conftest import honest, tiny_base  # noqa: F401 (fixtures)
