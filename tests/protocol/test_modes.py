"""The mode registry and the reason table: the one owner of each concept."""

from __future__ import annotations

import inspect

import pytest

from loracommons.protocol import errors, modes

NAMES = ["m.layers.0.q_proj.lora_A.weight", "m.layers.0.q_proj.lora_B.weight"]


@pytest.mark.parametrize(
    ("mode", "sent", "trains_a"),
    [("ffa", NAMES[1:], False), ("exact", NAMES, True), ("fedavg", NAMES, True)],
)
def test_builtin_modes_say_what_travels(mode: str, sent: list[str], trains_a: bool) -> None:
    m = modes.get(mode)
    assert m.sent_names(reversed(NAMES)) == sent
    assert m.trains("lora_A") is trains_a and m.trains("lora_B")


def test_unknown_mode_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="ffa, exact, fedavg"):
        modes.get("fedprox")


def test_a_mode_is_registered_once_and_checked() -> None:
    with pytest.raises(ValueError, match="already registered"):
        modes.register(modes.Mode("ffa", "again", ("lora_B",)))
    with pytest.raises(ValueError, match="sends must name factors"):
        modes.Mode("odd", "bad factor", ("lora_C",))
    toy = modes.register(modes.Mode("toy-a-only", "A alone", ("lora_A",)))
    try:
        assert "toy-a-only" in modes.names() and toy.sent_names(NAMES) == NAMES[:1]
    finally:
        modes.unregister("toy-a-only")
    assert "toy-a-only" not in modes.names()


def test_every_protocol_error_reason_is_in_the_reason_table() -> None:
    members = inspect.getmembers(errors, inspect.isclass)
    classes = [c for _, c in members if issubclass(c, errors.ProtocolError)]
    assert len(classes) > 10
    for cls in classes:
        assert errors.Reason(cls.reason).doc, cls
    assert set(errors.REASON_DOCS) == set(errors.Reason)
    assert f"{errors.Reason.LATE}" == "late" and errors.Reason.LATE == "late"
