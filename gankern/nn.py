"""Drop-in layers built on gankern's fused functional ops.

=====================================  =============================================  ==========================
gankern module                         replaces                                       functional op
=====================================  =============================================  ==========================
``LinearLeakyReLU``                    ``nn.Linear`` -> ``nn.LeakyReLU``              ``gankern.linear_leaky_relu``
``BatchNormReLU1d`` / ``2d``           ``nn.BatchNorm1d/2d`` -> ``nn.ReLU``           ``gankern.batch_norm_relu``
``BatchNormLeakyReLU1d`` / ``2d``      ``nn.BatchNorm1d/2d`` -> ``nn.LeakyReLU``      ``gankern.batch_norm_leaky_relu``
``BCEWithLogitsLoss``                  ``nn.BCEWithLogitsLoss``                       ``gankern.bce_with_logits``
``Linear``                             ``nn.Linear`` (no activation)                  ``gankern.linear_leaky_relu``
                                                                                      with ``negative_slope=1``
=====================================  =============================================  ==========================

Each module has exactly the parameters, buffers, initialisation (``reset_parameters``) and
``state_dict`` keys/metadata of the torch module it replaces, so checkpoints load both ways with
``strict=True``.  Every module takes ``backend=None`` (a plain attribute, passed to the functional
op; ``None`` = the default selection, see ``gankern.backends()``).

Deliberately, ``LinearLeakyReLU`` is *not* an ``nn.Linear`` subclass and ``BatchNormReLU*`` are
*not* ``_BatchNorm`` subclasses (they derive from ``_NormBase``, like torch's BatchNorm/InstanceNorm
base): code that finds ``nn.Linear`` / ``_BatchNorm`` by ``isinstance`` and rewrites them
(``nn.SyncBatchNorm.convert_sync_batchnorm``, LoRA wrappers, quantization) would otherwise silently
drop the fused activation.

Autocast mirrors torch: ``LinearLeakyReLU`` runs in the autocast dtype (like ``nn.Linear``);
``BatchNormReLU*`` / ``BatchNormLeakyReLU*`` take a reduced-precision input with float32 parameters/statistics, computes the
statistics in float32 and returns the input's dtype (like ``nn.BatchNorm``); ``BCEWithLogitsLoss``
runs in float32 (like ``F.binary_cross_entropy_with_logits``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import Module, Parameter, init
from torch.nn.functional import _verify_batch_size
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.loss import _Loss

import inspect

from .ops.batch_norm_relu import batch_norm_leaky_relu as _batch_norm_leaky_relu
from .ops.batch_norm_relu import batch_norm_relu as _batch_norm_relu
from .ops.bce import bce_with_logits as _bce_with_logits
from .ops.linear_leaky_relu import linear_leaky_relu as _linear_leaky_relu

__all__ = ["LinearLeakyReLU", "Linear", "BatchNormReLU1d", "BatchNormReLU2d", "BatchNormLeakyReLU1d",
           "BatchNormLeakyReLU2d", "BCEWithLogitsLoss"]

# torch >= 2.12 gives _NormBase (and nn.BatchNorm*) a keyword ``bias``; torch 2.11 has none.
_NORMBASE_HAS_BIAS = "bias" in inspect.signature(_NormBase.__init__).parameters

_LOW = (torch.float16, torch.bfloat16)


def _autocast_cast(t, dtype):
    # torch's autocast casts floating tensors except float64 ("eligible" tensors).
    if t is not None and t.is_floating_point() and t.dtype != dtype and t.dtype != torch.float64:
        return t.to(dtype)
    return t


class LinearLeakyReLU(Module):
    r"""``leaky_relu(linear(input, weight, bias), negative_slope)`` in one fused op.

    Same arguments, parameters (``weight`` of shape ``(out_features, in_features)``, ``bias``),
    initialisation and state_dict as ``nn.Linear``, plus ``negative_slope`` (default 0.2, the GAN
    discriminator's; note ``nn.LeakyReLU`` defaults to 0.01) and ``backend``.
    Input ``(*, in_features)`` -> output ``(*, out_features)``.
    """

    __constants__ = ["in_features", "out_features", "negative_slope"]
    in_features: int
    out_features: int
    negative_slope: float
    weight: Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True, negative_slope: float = 0.2,
                 device=None, dtype=None, *, backend: str | None = None) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.negative_slope = negative_slope
        self.backend = backend
        self.weight = Parameter(torch.empty((out_features, in_features), **factory_kwargs))
        if bias:
            self.bias = Parameter(torch.empty(out_features, **factory_kwargs))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As ``nn.Linear.reset_parameters``: kaiming_uniform(a=sqrt(5)) weight, U(+-1/sqrt(fan_in)) bias."""
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            init.uniform_(self.bias, -bound, bound)

    def forward(self, input: Tensor) -> Tensor:
        weight, bias = self.weight, self.bias
        dev = input.device.type
        if torch.is_autocast_enabled(dev):  # as nn.Linear: run in the autocast dtype
            dt = torch.get_autocast_dtype(dev)
            input, weight, bias = _autocast_cast(input, dt), _autocast_cast(weight, dt), _autocast_cast(bias, dt)
        return _linear_leaky_relu(input, weight, bias, self.negative_slope, backend=self.backend)

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
             f"negative_slope={self.negative_slope}")
        if self.backend is not None:
            s += f", backend={self.backend!r}"
        return s


class Linear(LinearLeakyReLU):
    r"""``nn.Linear`` on gankern's GEMM path: ``linear_leaky_relu`` with ``negative_slope=1`` (no activation).

    For the Linear layers that feed a BatchNorm (generator blocks) or an output activation: same
    parameters, initialisation and state_dict as ``nn.Linear``.  On CPU its fp32 forward and input
    gradient run on oneDNN's inner product (bias fused), and the bias gradient comes from one
    column-sum pass; the backward keeps no activation mask.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 backend: str | None = None) -> None:
        super().__init__(in_features, out_features, bias, 1.0, device, dtype, backend=backend)

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        if self.backend is not None:
            s += f", backend={self.backend!r}"
        return s


class _BatchNormAct(_NormBase):
    """``act(batch_norm(input))``, act = relu (``negative_slope == 0``) or leaky_relu; the forward
    mirrors ``torch.nn.modules.batchnorm._BatchNorm.forward``."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True,
                 negative_slope: float = 0.0, backend: str | None = None) -> None:
        if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)) or \
                not (math.isfinite(negative_slope) and negative_slope >= 0):
            raise ValueError(f"batch_norm_leaky_relu: negative_slope must be a finite float >= 0, "
                             f"got {negative_slope!r}")
        if _NORMBASE_HAS_BIAS:
            super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                             bias=bias)
        else:  # torch 2.11: no ``bias`` keyword; bias=False is what torch >= 2.12 does (no bias Parameter)
            super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
            if affine and not bias:
                self.bias = None
        self.negative_slope = float(negative_slope)
        self.backend = backend

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:  # (bias may be None: bias=False)
            init.ones_(self.weight)
            if self.bias is not None:
                init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)

        # Same bookkeeping as torch's _BatchNorm.forward (incl. momentum=None: cumulative average).
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:
                    exponential_average_factor = self.momentum

        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        running_mean = self.running_mean if not self.training or self.track_running_stats else None
        running_var = self.running_var if not self.training or self.track_running_stats else None
        if bn_training:  # torch's F.batch_norm check: ValueError for a single value per channel
            _verify_batch_size(input.size())

        # Mixed precision (autocast's reduced-precision activations, float32 module): the op takes the
        # fp16/bf16 input with the float32 parameters and running stats as they are and, like nn.BatchNorm,
        # computes statistics and normalisation in float32 and returns the input's dtype.
        if self.negative_slope == 0.0:
            return _batch_norm_relu(input, running_mean, running_var, self.weight, self.bias, bn_training,
                                    exponential_average_factor, self.eps, backend=self.backend)
        return _batch_norm_leaky_relu(input, running_mean, running_var, self.weight, self.bias, bn_training,
                                      exponential_average_factor, self.eps, self.negative_slope, backend=self.backend)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.negative_slope != 0.0:
            s += f", negative_slope={self.negative_slope}"
        if self.backend is not None:
            s += f", backend={self.backend!r}"
        return s


class _BatchNormReLU(_BatchNormAct):
    """``relu(batch_norm(input))``: the op with ``negative_slope = 0``."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True,
                 backend: str | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                         negative_slope=0.0, backend=backend)


class _BatchNormLeakyReLU(_BatchNormAct):
    """``leaky_relu(batch_norm(input), negative_slope)``."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, negative_slope: float = 0.2, device=None, dtype=None, *,
                 bias: bool = True, backend: str | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                         negative_slope=negative_slope, backend=backend)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.negative_slope == 0.0:  # the base class shows only non-zero slopes
            s = s.replace(f"track_running_stats={self.track_running_stats}",
                          f"track_running_stats={self.track_running_stats}, negative_slope=0.0", 1)
        return s


def _check_1d(input):
    if input.dim() != 2 and input.dim() != 3:
        raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


def _check_2d(input):
    if input.dim() != 4:
        raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class BatchNormReLU1d(_BatchNormReLU):
    r"""``nn.BatchNorm1d`` followed by ``nn.ReLU``, fused.  Input ``(N, C)`` or ``(N, C, L)``.

    Same arguments (incl. ``momentum=None`` = cumulative moving average, ``affine``,
    ``track_running_stats``, keyword ``bias``), parameters, buffers (``running_mean``,
    ``running_var``, ``num_batches_tracked``), initialisation, state_dict (version 2) and
    input checks as ``nn.BatchNorm1d``.
    """

    def _check_input_dim(self, input):
        _check_1d(input)


class BatchNormReLU2d(_BatchNormReLU):
    r"""``nn.BatchNorm2d`` followed by ``nn.ReLU``, fused.  Input ``(N, C, H, W)``.

    Same arguments, parameters, buffers, initialisation, state_dict and input checks as ``nn.BatchNorm2d``.
    """

    def _check_input_dim(self, input):
        _check_2d(input)


class BatchNormLeakyReLU1d(_BatchNormLeakyReLU):
    r"""``nn.BatchNorm1d`` followed by ``nn.LeakyReLU(negative_slope)``, fused.  Input ``(N, C)`` or ``(N, C, L)``.

    ``BatchNormLeakyReLU1d(num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
    negative_slope=0.2, device=None, dtype=None, *, backend=None)``: nn.BatchNorm1d's arguments in its
    order (eps and momentum kept exactly as given, e.g. ``BatchNormLeakyReLU1d(256, 0.8)`` is eps 0.8
    as in ``nn.BatchNorm1d(256, 0.8)``), its parameters, buffers, initialisation and state_dict, plus
    ``negative_slope >= 0`` (default 0.2, the GAN one; nn.LeakyReLU defaults to 0.01).
    """

    def _check_input_dim(self, input):
        _check_1d(input)


class BatchNormLeakyReLU2d(_BatchNormLeakyReLU):
    r"""``nn.BatchNorm2d`` followed by ``nn.LeakyReLU(negative_slope)``, fused.  Input ``(N, C, H, W)``.

    Arguments as :class:`BatchNormLeakyReLU1d`; parameters, buffers, initialisation, state_dict and
    input checks as ``nn.BatchNorm2d``.
    """

    def _check_input_dim(self, input):
        _check_2d(input)


class BCEWithLogitsLoss(_Loss):
    r"""Drop-in ``nn.BCEWithLogitsLoss`` on ``gankern.bce_with_logits``.

    Same arguments (in torch's order, incl. the deprecated ``size_average``/``reduce``), the same
    buffers ``weight`` and ``pos_weight`` (in the state_dict when given).  ``target`` may also be a
    Python number (e.g. ``1.0`` for "real"), which avoids materialising a ones/zeros tensor.
    """

    def __init__(self, weight: Tensor | None = None, size_average=None, reduce=None, reduction: str = "mean",
                 pos_weight: Tensor | None = None, *, backend: str | None = None) -> None:
        super().__init__(size_average, reduce, reduction)
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)
        self.weight: Tensor | None
        self.pos_weight: Tensor | None
        self.backend = backend

    def forward(self, input: Tensor, target) -> Tensor:
        weight, pos_weight = self.weight, self.pos_weight
        dev = input.device.type
        if torch.is_autocast_enabled(dev):  # as F.binary_cross_entropy_with_logits: float32 under autocast
            f32 = torch.float32
            input, weight, pos_weight = _autocast_cast(input, f32), _autocast_cast(weight, f32), \
                _autocast_cast(pos_weight, f32)
            if isinstance(target, Tensor):
                target = _autocast_cast(target, f32)
        return _bce_with_logits(input, target, weight, self.reduction, pos_weight, backend=self.backend)

    def extra_repr(self) -> str:
        return "" if self.backend is None else f"backend={self.backend!r}"


# ------------------------------------------------------------------------------------------------
# Synchronized BatchNorm + ReLU (multi-device training; the collectives live in gankern/distributed.py)

class SyncBatchNormReLU(_BatchNormReLU):
    r"""``torch.nn.SyncBatchNorm`` followed by ``nn.ReLU``, on gankern's fused kernels.

    Same arguments as ``torch.nn.SyncBatchNorm`` (``process_group``: None = the whole world) plus
    ``backend``; same parameters, buffers and state_dict (keys and version) as ``torch.nn.SyncBatchNorm``
    and ``nn.BatchNorm*d``.  Any input of 2 or more dimensions ((N, C), (N, C, L), (N, C, H, W),
    contiguous or channels-last).  In training mode with an initialised process group of more than one
    rank, the batch statistics are those of the whole group's batch (one all-reduce per forward, one
    per backward; see ``gankern.distributed``); in eval mode, with one rank, or with no process group,
    it is exactly ``BatchNormReLU1d/2d``.  Usually made by ``convert_sync_batchnorm(model)``.

    ``negative_slope`` (class default 0.0 = ReLU) is what the activation after the normalisation uses;
    ``convert_sync_batchnorm`` copies it from the module it converts.
    """

    negative_slope: float = 0.0

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None, *,
                 bias: bool = True, backend: str | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                         backend=backend)
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        from .distributed import local_batch_norm_act, sync_batch_norm_act, sync_needed
        self._check_input_dim(input)
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")
        if self.momentum is None:
            factor = 0.0
        else:
            factor = self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        running_mean = self.running_mean if not self.training or self.track_running_stats else None
        running_var = self.running_var if not self.training or self.track_running_stats else None
        sync = bn_training and self.training and sync_needed(self.process_group)
        if bn_training and not sync:
            _verify_batch_size(input.size())
        slope = float(self.negative_slope)

        if not sync:  # the op itself: reduced-precision input with float32 parameters as is (see _BatchNormAct)
            return local_batch_norm_act(input, running_mean, running_var, self.weight, self.bias, bn_training, factor,
                                        self.eps, slope, self.backend)
        # The synchronized path (gankern.distributed) normalises in the input's dtype: run it in the float32 of
        # the parameters for a reduced-precision input, output in the input's dtype.
        ref = self.weight if self.weight is not None else self.running_mean
        low = ref is not None and input.dtype in _LOW and ref.dtype == torch.float32
        out = sync_batch_norm_act(input.float() if low else input, running_mean, running_var, self.weight, self.bias,
                                  factor, self.eps, slope, self.process_group, self.backend)
        return out.to(input.dtype) if low else out


class SyncBatchNormLeakyReLU(SyncBatchNormReLU):
    r"""``torch.nn.SyncBatchNorm`` followed by ``nn.LeakyReLU(negative_slope)``, on gankern's fused kernels: the
    synchronized twin of ``BatchNormLeakyReLU1d/2d`` (``convert_sync_batchnorm`` makes it from them)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, negative_slope: float = 0.2, device=None,
                 dtype=None, *, bias: bool = True, backend: str | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype,
                         bias=bias, backend=backend)
        if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)) or \
                not (math.isfinite(negative_slope) and negative_slope >= 0):
            raise ValueError(f"SyncBatchNormLeakyReLU: negative_slope must be a finite float >= 0, "
                             f"got {negative_slope!r}")
        self.negative_slope = float(negative_slope)


def convert_sync_batchnorm(module: Module, process_group=None) -> Module:
    """Mirror of ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: gankern BatchNorm+ReLU layers become
    ``SyncBatchNormReLU``, torch ``BatchNorm*d`` become ``torch.nn.SyncBatchNorm``; same Parameters,
    buffers and state_dict keys.  See ``gankern.distributed.convert_sync_batchnorm``."""
    from .distributed import convert_sync_batchnorm as _convert
    return _convert(module, process_group)


__all__ += ["SyncBatchNormReLU", "SyncBatchNormLeakyReLU", "convert_sync_batchnorm"]

# ---------------------------------------------------------------- conv + bias + LeakyReLU/ReLU
from torch import nn as _tnn  # noqa: E402
from torch.nn import functional as _F  # noqa: E402

from .ops.bias_leaky_relu import bias_leaky_relu as _bias_leaky_relu  # noqa: E402

_CONV_ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
               "output_padding", "groups", "padding_mode")


class _ConvBiasLeakyReLU(Module):
    """A conv run without its bias, then ``gankern.bias_leaky_relu`` (bias + activation in one pass).

    Same constructor arguments, parameters (``weight``, ``bias``), initialisation and state_dict as the
    torch conv it replaces (it builds that conv and takes its Parameters), plus ``negative_slope``
    (0 = ReLU) and ``backend``.  ``padding_mode`` must be ``"zeros"``.
    """

    _torch_cls: type = _tnn.Conv2d
    weight: Tensor

    def __init__(self, *args, negative_slope: float = 0.2, backend: str | None = None, **kwargs) -> None:
        super().__init__()
        self._adopt(self._torch_cls(*args, **kwargs), negative_slope, backend)

    def _adopt(self, conv, negative_slope, backend):
        if conv.padding_mode != "zeros":
            raise ValueError(f"{type(self).__name__}: padding_mode must be 'zeros'; got {conv.padding_mode!r}")
        for a in _CONV_ATTRS:
            setattr(self, a, getattr(conv, a))
        self.register_parameter("weight", conv.weight)
        self.register_parameter("bias", conv.bias)
        self.negative_slope = negative_slope
        self.backend = backend

    @classmethod
    def from_conv(cls, conv, negative_slope: float, backend: str | None = None):
        """The fused module sharing ``conv``'s Parameter objects (used by ``gankern.fuse``)."""
        m = cls.__new__(cls)
        Module.__init__(m)
        m._adopt(conv, negative_slope, backend)
        m.train(conv.training)
        return m

    def to_conv(self):
        """The plain torch conv sharing this module's Parameter objects (used by ``gankern.unfuse``)."""
        kw = {a: getattr(self, a) for a in ("stride", "padding", "dilation", "groups", "padding_mode")}
        if self.transposed:
            kw["output_padding"] = self.output_padding
        conv = self._torch_cls(self.in_channels, self.out_channels, self.kernel_size, bias=self.bias is not None,
                               device="meta", **kw)
        conv.weight, conv.bias = self.weight, self.bias
        conv.train(self.training)
        return conv

    def _act(self, y: Tensor) -> Tensor:
        bias = self.bias
        if bias is None:
            bias = y.new_zeros(y.shape[1])
        elif bias.dtype != y.dtype and torch.is_autocast_enabled(y.device.type):
            bias = bias.to(y.dtype)  # as the conv would have cast it under autocast
        return _bias_leaky_relu(y, bias, self.negative_slope, 1, backend=self.backend)

    def extra_repr(self) -> str:
        s = _tnn.Conv2d.extra_repr(self) + f", negative_slope={self.negative_slope}"
        if self.backend is not None:
            s += f", backend={self.backend!r}"
        return s


class Conv2dLeakyReLU(_ConvBiasLeakyReLU):
    r"""``nn.Conv2d`` followed by ``nn.LeakyReLU(negative_slope)`` (or ``nn.ReLU`` with slope 0): the conv
    runs without its bias, ``gankern.bias_leaky_relu`` adds the bias and activates in one pass
    (backward from the saved output).  Same arguments, parameters, init and state_dict as ``nn.Conv2d``."""

    _torch_cls = _tnn.Conv2d

    def forward(self, input: Tensor) -> Tensor:
        y = _F.conv2d(input, self.weight, None, self.stride, self.padding, self.dilation, self.groups)
        return self._act(y)


class ConvTranspose2dLeakyReLU(_ConvBiasLeakyReLU):
    r"""``nn.ConvTranspose2d`` followed by ``nn.LeakyReLU(negative_slope)`` / ``nn.ReLU`` (slope 0), fused as
    ``Conv2dLeakyReLU``.  Same arguments, parameters, init and state_dict as ``nn.ConvTranspose2d``;
    ``forward(input, output_size=None)`` as torch's."""

    _torch_cls = _tnn.ConvTranspose2d

    def forward(self, input: Tensor, output_size=None) -> Tensor:
        num_spatial_dims = 2
        output_padding = _tnn.ConvTranspose2d._output_padding(
            self, input, output_size, self.stride, self.padding, self.kernel_size, num_spatial_dims, self.dilation)
        y = _F.conv_transpose2d(input, self.weight, None, self.stride, self.padding, output_padding, self.groups,
                                self.dilation)
        return self._act(y)


__all__ += ["Conv2dLeakyReLU", "ConvTranspose2dLeakyReLU"]
