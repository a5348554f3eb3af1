"""Roles declared on dataclass fields, as lzn.roles defines them: a field's own role, else its
section's; dotted keys take the role of their longest field path."""
from dataclasses import dataclass, field
from typing import Optional

import pytest

from lzn.roles import Role, Roles, field_roles, role_field


@dataclass
class Inner:
    steps: int = role_field(Role.LENGTH, default=3)  # overrides the section's role
    lr: dict = field(default_factory=dict)  # inherits the section's


@dataclass
class Data:  # a section without a role: each field has its own
    name: str = role_field(Role.TASK, default="x")
    root: Optional[str] = role_field(Role.RUNTIME, default=None)


@dataclass
class Schema:
    name: str = role_field(Role.TASK, default="t")
    inner: Inner = role_field(Role.TRAINING, default_factory=Inner)
    data: Data = field(default_factory=Data)
    device: str = role_field(Role.RUNTIME, default="cpu")


def test_a_field_takes_its_own_role_else_its_sections():
    assert field_roles(Schema) == {
        "name": Role.TASK, "inner": Role.TRAINING, "inner.steps": Role.LENGTH, "inner.lr": Role.TRAINING,
        "data.name": Role.TASK, "data.root": Role.RUNTIME, "device": Role.RUNTIME}


def test_a_field_with_no_role_anywhere_is_refused():
    @dataclass
    class Bad:
        seed: int = 0

    with pytest.raises(TypeError, match="Bad.seed .*declares no role"):
        field_roles(Bad)


def test_flat_keys_take_the_role_of_their_longest_field_path():
    roles = Roles(Schema)
    assert roles.of("inner.lr.encoder") is Role.TRAINING
    assert roles.of("inner.steps") is Role.LENGTH
    assert roles.of("data.root") is Role.RUNTIME
    assert roles.of("nowhere.key") is None


def test_only_changes_to_what_is_trained_are_refused():
    roles = Roles(Schema)
    old = {"name": "t", "inner.steps": "3", "inner.lr.encoder": "0.1", "device": "cpu", "data.root": "/a"}
    new = {"name": "t", "inner.steps": "9", "inner.lr.encoder": "0.2", "device": "cuda", "data.root": "/b",
           "added.later": "1"}
    assert roles.refused_changes(old, new) == ["inner.lr.encoder: '0.1' -> '0.2'"]
    assert roles.refused_changes(old, dict(old)) == []


def test_top_level_names_by_role():
    roles = Roles(Schema)
    assert roles.top_level([Role.RUNTIME]) == ("device",)
    assert roles.top_level([Role.RUNTIME], "data.") == ("root",)
    assert roles.top_level([Role.TRAINING, Role.TASK]) == ("name", "inner")
