"""Old home of checkpoints and the run folder, now ``gankern.gan.checkpoint``: this name is that module (same object)."""
import sys

from .gan import checkpoint as _moved

sys.modules[__name__] = _moved
