"""PLACEHOLDER (foundation commit): batch_norm_relu dispatches to the reference for now."""
from __future__ import annotations

from .. import reference


def batch_norm_relu(*args, backend=None, **kwargs):
    return reference.batch_norm_relu(*args, **kwargs)
