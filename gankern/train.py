"""Old home of the trainer, now ``gankern.gan.trainer``: this name is that module (same object)."""
import sys

from .gan import trainer as _moved

sys.modules[__name__] = _moved
