"""The registry: every model family by its one name.

    family = families.of(config)   # the config's family, after the family's own checks
    family.block, family.init_state(config, batch), family.schedule(config, ratio_k), ...

Adding a family: its module (a ``Family`` record, and its block if it has its
own), a line in ``FAMILIES`` below, and a config that names it.
"""

from __future__ import annotations

import types

from mvar_jax.models import m_var, mvar, var
from mvar_jax.models.config import TransformerConfig
from mvar_jax.models.family import Family

FAMILIES = types.MappingProxyType({f.name: f for f in (mvar.FAMILY, var.FAMILY, m_var.FAMILY)})
NAMES = tuple(FAMILIES)


def get(name: str) -> Family:
    """The family called ``name``; ValueError naming the known ones otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; expected one of {', '.join(NAMES)}")
    return FAMILIES[name]


def of(config: TransformerConfig) -> Family:
    """``config``'s family, once it has checked the config (ValueError naming the field)."""
    family = get(config.family)
    try:
        family.check(config)
    except ValueError as e:
        raise ValueError(f"TransformerConfig ({family.title}): {e}") from e
    return family
