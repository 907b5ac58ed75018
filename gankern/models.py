"""Old home of the GAN models, now ``gankern.gan.models``: this name is that module (same object)."""
import sys

from .gan import models as _moved

sys.modules[__name__] = _moved
