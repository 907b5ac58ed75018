"""Old home of the command line, now ``gankern.gan.cli``: this name is that module (same object)."""
import sys

from .gan import cli as _moved

sys.modules[__name__] = _moved
