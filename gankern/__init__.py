"""gankern: fused GAN kernels for PyTorch.

Functional ops (each takes ``backend=None``: "auto", "cpp", "cuda", "triton", "reference"):
    bce_with_logits, batch_norm_relu, batch_norm_leaky_relu, linear_leaky_relu, bias_leaky_relu
Layers: ``gankern.nn``; model conversion: ``gankern.fuse`` / ``gankern.unfuse``;
what can run here: ``gankern.backends()``; CPU output-block cache: ``gankern.empty_cache()`` / ``cache_info()``.
"""
from __future__ import annotations

__version__ = "0.1.0"

from ._backends import BackendUnavailableError, backends, cache_info, empty_cache
from ._backends import load_extension as _load_extension

_load_extension()  # registers the compiled ops if the extension is built (no compilation here); the ops
# modules below look their overloads up and register the Triton kernels as the `.triton` ones

from .ops.bce import bce_with_logits  # noqa: E402
from .ops.batch_norm_relu import batch_norm_leaky_relu, batch_norm_relu  # noqa: E402
from .ops.linear_leaky_relu import linear_leaky_relu  # noqa: E402
from .ops.bias_leaky_relu import bias_leaky_relu  # noqa: E402
from . import nn  # noqa: E402
from .fuse import fuse, unfuse  # noqa: E402

__all__ = ["bce_with_logits", "batch_norm_relu", "batch_norm_leaky_relu", "linear_leaky_relu", "bias_leaky_relu", "backends", "fuse", "unfuse",
           "nn", "BackendUnavailableError", "empty_cache", "cache_info", "__version__"]


def _warn_if_missing():
    import warnings
    from ._backends import _ext_error
    if _ext_error is not None:
        warnings.warn(f"gankern: {_ext_error}. The 'reference' backend is used instead (the 'triton' one runs "
                      "through the compiled ops too); see gankern.backends().", RuntimeWarning, stacklevel=3)


_warn_if_missing()
