"""Old home of the datasets and the sampler, now ``gankern.gan.data``: this name is that module (same object)."""
import sys

from .gan import data as _moved

sys.modules[__name__] = _moved
