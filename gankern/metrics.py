"""Old home of the quality metric, now ``gankern.gan.metrics``: this name is that module (same object)."""
import sys

from .gan import metrics as _moved

sys.modules[__name__] = _moved
