"""PLACEHOLDER (foundation commit): bce_with_logits dispatches to the reference for now."""
from __future__ import annotations

from .. import reference


def bce_with_logits(*args, backend=None, **kwargs):
    return reference.bce_with_logits(*args, **kwargs)
