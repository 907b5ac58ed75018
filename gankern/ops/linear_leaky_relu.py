"""PLACEHOLDER (foundation commit): linear_leaky_relu dispatches to the reference for now."""
from __future__ import annotations

from .. import reference


def linear_leaky_relu(*args, backend=None, **kwargs):
    return reference.linear_leaky_relu(*args, **kwargs)
