"""What each setting of a run is for, declared once on the schema's dataclass fields.

A field's role sits in its metadata (`role_field(Role.MODEL, default=...)`); a field without
one takes its parent's (the `optim:` section is TRAINING, so is every learning rate in it).
Everything that treats settings differently is derived from the roles: which changes a run
folder may resume with, what a sweep may vary, which settings an evaluation's result depends
on, what the command line of an evaluation decides.

What is trained comes in three kinds, because they are told apart downstream:
- TASK: what the task is, what its metric means (the task's name, objective, the data's
  identity and shape); a sweep never varies it;
- MODEL: the model and its inference (architecture, latent space, alignment); an evaluation's
  numbers depend on it given the weights;
- TRAINING: how the weights are found (optimizer, seed, batch, augmentation, EMA).
Then LENGTH (how long it trains), RUNTIME (where and how it runs and reports) and EVALUATION
(how it is evaluated).
"""
from __future__ import annotations

import dataclasses
import enum
import typing
from typing import Any, Iterable


class Role(enum.Enum):
    TASK = "task"
    MODEL = "model"
    TRAINING = "training"
    LENGTH = "length"
    RUNTIME = "runtime"
    EVALUATION = "evaluation"


RESUMABLE = frozenset({Role.LENGTH, Role.RUNTIME, Role.EVALUATION})  # a resumed run may change these


def role_field(role: Role, **kwargs: Any) -> Any:
    """A dataclass field with its role (kwargs as `dataclasses.field`)."""
    return dataclasses.field(metadata={"role": role}, **kwargs)


def _nested_dataclass(schema: type, name: str) -> type | None:
    hint = typing.get_type_hints(schema).get(name)
    for candidate in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def field_roles(schema: type, inherited: Role | None = None, prefix: str = "") -> dict[str, Role]:
    """{dotted field path: role} of every field of `schema`, nested dataclasses included. A
    field without a role takes its section's; one with neither is an error."""
    out = {}
    for f in dataclasses.fields(schema):
        role = f.metadata.get("role", inherited)
        path = prefix + f.name
        nested = _nested_dataclass(schema, f.name)
        if role is None and nested is None:
            raise TypeError(f"{schema.__name__}.{f.name} ({path}) declares no role: give it "
                            "lzn.roles.role_field(Role...) or give its section one")
        if role is not None:  # a section without one has a role on each of its fields
            out[path] = role
        if nested is not None:
            out.update(field_roles(nested, role, path + "."))
    return out


class Roles:
    """The roles of a schema, looked up by dotted key: a flattened param such as
    "optim.lr.encoder" takes the role of its longest field path ("optim.lr")."""

    def __init__(self, schema: type):
        self.schema = schema
        self.by_path = field_roles(schema)

    def of(self, key: str) -> Role | None:
        parts = key.split(".")
        for n in range(len(parts), 0, -1):
            role = self.by_path.get(".".join(parts[:n]))
            if role is not None:
                return role
        return None

    def keys(self, params: Iterable[str], roles: Iterable[Role]) -> list[str]:
        """The keys of `params` whose role is one of `roles`, in their order."""
        wanted = set(roles)
        return [k for k in params if self.of(k) in wanted]

    def top_level(self, roles: Iterable[Role], prefix: str = "") -> tuple[str, ...]:
        """The names of the fields directly under `prefix` ("" or e.g. "data.") with one of `roles`."""
        wanted = set(roles)
        depth = prefix.count(".")
        return tuple(p[len(prefix):] for p, r in self.by_path.items()
                     if p.startswith(prefix) and p.count(".") == depth and r in wanted)

    def refused_changes(self, old: dict[str, str], new: dict[str, str]) -> list[str]:
        """"key: old -> new" for every setting that `new` changes from `old` and that changes
        what is trained (not how long, where or how it runs, or how it is evaluated). Keys
        missing from either side are not changes (a setting added to the schema later)."""
        return [f"{k}: {old[k]!r} -> {v!r}" for k, v in new.items()
                if k in old and old[k] != v and self.of(k) not in RESUMABLE]
