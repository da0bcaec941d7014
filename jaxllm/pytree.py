"""Frozen dataclasses that are JAX pytrees: what flax.struct.dataclass gave, without importing flax (a third of a
second of every start). Fields are leaves, except those made with `static()`, which are part of the tree's
structure (compared and hashed: a jitted function is traced again when one changes)."""

from __future__ import annotations

import dataclasses

import jax


def struct(cls=None, *, kw_only: bool = False):
    """@struct or @struct(kw_only=True) on a class: a frozen dataclass registered as a pytree, with
    `.replace(**changes)`."""
    def make(cls):
        cls = dataclasses.dataclass(frozen=True, kw_only=kw_only)(cls)
        cls.replace = dataclasses.replace
        return jax.tree_util.register_dataclass(cls)

    return make if cls is None else make(cls)


def static(**field_kwargs):
    """A field that is part of the tree's structure, not a leaf."""
    return dataclasses.field(metadata={"static": True}, **field_kwargs)
