"""Per-op sample inputs, one generator per op, shared by the correctness (vs float64), opcheck and
torch.compile tests (tests/test_samples.py) on every device and backend.

A sample is a list of arguments of the op's public function, in order; a tensor argument is an ``Arg``:
float64 data plus a view (transposed, sliced with a step, expanded, channels-last, ...) applied after the
cast to the tested dtype and device, so every backend sees the same odd layout and the float64 reference
the same values.  ``OpSpec`` holds the public function, its plain-PyTorch float64 twin and the mapping to
the op's schema (for ``torch.library.opcheck``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import gankern

LOW = (torch.float32, torch.float16, torch.bfloat16)
ALL = LOW + (torch.float64,)


@dataclasses.dataclass
class Arg:
    """A tensor argument: float64 ``data`` (CPU), cast to the sample's dtype (or ``dtype``: e.g. float32
    BatchNorm parameters beside bf16 input) and device, then ``view``.  ``grad``: a differentiable input
    (its leaf is the tensor before the view, so the view's backward is torch's in both runs).  ``out``: updated
    in place by the op (compared after the call)."""
    data: torch.Tensor
    view: Callable = lambda t: t
    dtype: Optional[torch.dtype] = None
    grad: bool = False
    out: bool = False

    def build(self, dtype, device, reference=False):
        """(leaf, view of it).  reference: the same values (rounded to the tested dtype) in float64."""
        leaf = self.data.to(device=device, dtype=self.dtype or dtype)
        if reference:
            leaf = leaf.double()
        if self.grad:
            leaf.requires_grad_(True)
        t = self.view(leaf)
        if reference and not self.out:
            # the reference sees the same values densely: torch 2.13's own float64 CPU batch_norm backward is
            # wrong with an expanded weight (grad_input off by 0.4 at (6, 3); float32 and a dense weight are right)
            t = t.contiguous()
        return leaf, t


@dataclasses.dataclass
class Sample:
    name: str
    args: list
    scale: float = 1.0        # tolerance scale for the outputs (reductions: the length)
    grad_scale: float = 1.0   # ... and for the gradients
    nan_output: bool = False  # the output is NaN by definition (mean over nothing): opcheck compares without NaN


@dataclasses.dataclass
class OpSpec:
    name: str
    fn: Callable               # fn(*args, backend=...): the public function
    ref: Callable              # ref(*args): plain PyTorch, called with float64 tensors
    schema_args: Callable      # args -> the arguments of torch.ops.gankern.<name>
    samples: Callable          # (device, dtype) -> list[Sample]
    no_fp64: tuple = ()        # backends without float64 for this op

    def build(self, sample, dtype, device, reference=False):
        """(leaves, args): the sample's arguments as tensors (leaves: the differentiable ones, in order)."""
        leaves, args = [], []
        for a in sample.args:
            if isinstance(a, Arg):
                leaf, t = a.build(dtype, device, reference)
                if a.grad:
                    leaves.append(leaf)
                args.append(t)
            else:
                args.append(a)
        return leaves, args

    def outs(self, sample, args):
        return [t for a, t in zip(sample.args, args) if isinstance(a, Arg) and a.out]


def _r(*shape, lo=None, hi=None, scale=1.0, shift=0.0):
    """float64 values: uniform in [lo, hi) when lo is given, else normal * scale + shift."""
    if lo is not None:
        return torch.rand(*shape, dtype=torch.float64) * (hi - lo) + lo
    return torch.randn(*shape, dtype=torch.float64) * scale + shift


def _big(device):
    return device != "cpu"  # the Triton interpreter on CPU is slow: the large shapes run on a device


# ----------------------------------------------------------------------------- linear + leaky_relu
def _llr_samples(device, dtype):
    out = []
    for M, K, N, slope in [(0, 5, 3, 0.2), (1, 1, 1, 0.2), (7, 13, 33, 0.2), (127, 7, 1, 0.0), (5, 16, 8, 1.0)]:
        out.append(Sample(f"{M}x{K}->{N} slope {slope}",
                          [Arg(_r(M, K), grad=True), Arg(_r(N, K) / max(K, 1) ** 0.5, grad=True),
                           Arg(_r(N), grad=True), slope], scale=4, grad_scale=4 * max(1, (max(M, K, N) ** 0.5) / 4)))
    out.append(Sample("transposed input, sliced weight, no bias",
                      [Arg(_r(9, 6), lambda t: t.t(), grad=True), Arg(_r(4, 18) / 3, lambda t: t[:, ::2], grad=True),
                       None, 0.2], scale=4, grad_scale=4))
    out.append(Sample("3-D input, expanded bias",
                      [Arg(_r(2, 3, 7), grad=True), Arg(_r(5, 7) / 3, grad=True), Arg(_r(1), lambda t: t.expand(5)),
                       0.2], scale=4, grad_scale=4))
    if _big(device):
        out.append(Sample("1000x127->1000", [Arg(_r(1000, 127), grad=True), Arg(_r(1000, 127) / 12, grad=True),
                                             Arg(_r(1000), grad=True), 0.2], scale=8, grad_scale=16))
    return out


LINEAR_LEAKY_RELU = OpSpec(
    "linear_leaky_relu",
    fn=lambda x, w, b, s, backend=None: gankern.linear_leaky_relu(x, w, b, s, backend=backend),
    ref=lambda x, w, b, s: F.leaky_relu(F.linear(x, w, b), s),
    schema_args=lambda x, w, b, s: (x, w, b, s),
    samples=_llr_samples)


# ----------------------------------------------------------------------------- batch norm + (leaky) relu
def _bn_samples(device, dtype):
    pdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else None  # fp32 params beside half input
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    out = []
    shapes = [((16, 5), None, "2-D"), ((1, 1, 1), None, "one element"), ((7, 3, 5), None, "1-D (N, C, L)"),
              ((4, 6, 3, 3), cl, "channels-last"), ((3, 4, 5, 2), lambda t: t[:, :, :, ::2], "sliced with a step"),
              ((0, 3, 2), None, "empty batch"), ((2, 0, 3), None, "zero channels"), ((127, 2), None, "127 rows")]
    if _big(device):
        shapes += [((1000, 7), None, "1000 rows"), ((3, 64, 8, 8), cl, "channels-last 64 ch")]
    for i, (shape, view, what) in enumerate(shapes):
        C = shape[1]
        training, slope = (i % 2 == 0), (0.0 if i % 3 else 0.2)
        n = max(1, math.prod(shape[:1] + shape[2:]))  # values per channel
        stats = [Arg(_r(C), dtype=pdt, out=True), Arg(_r(C, lo=0.5, hi=1.5), dtype=pdt, out=True)]
        params = [*stats, Arg(_r(C, lo=0.5, hi=1.5), dtype=pdt, grad=True), Arg(_r(C), dtype=pdt, grad=True)]
        if C == 0:  # torch's batch_norm takes no (0,) parameters (IndexError); the op with none gives an empty output
            params = [None] * 4
        out.append(Sample(f"{what} {shape} training={training} slope={slope}",
                          [Arg(_r(*shape, scale=3, shift=1), view or (lambda t: t), grad=True), *params,
                           training, 0.1, 1e-5, slope], scale=4, grad_scale=4 * max(1.0, n ** 0.5 / 4)))
    out.append(Sample("no affine, no running stats, eps 0.8", [Arg(_r(9, 4, scale=2), grad=True), None, None, None, None,
                                                              True, 0.1, 0.8, 0.2], scale=4, grad_scale=4))
    out.append(Sample("expanded weight", [Arg(_r(6, 3), grad=True), None, None,
                                          Arg(_r(1, lo=0.5, hi=1.5), lambda t: t.expand(3), dtype=pdt),
                                          Arg(_r(3), dtype=pdt), True, 0.1, 1e-5, 0.0], scale=4, grad_scale=4))
    return out


def _bn_ref(x, rm, rv, w, b, training, momentum, eps, slope):
    return F.leaky_relu(F.batch_norm(x, rm, rv, w, b, training, momentum, eps), slope)


BATCH_NORM_LEAKY_RELU = OpSpec(
    "batch_norm_relu",
    fn=lambda *a, backend=None: gankern.batch_norm_leaky_relu(*a[:8], negative_slope=a[8], backend=backend),
    ref=_bn_ref,
    schema_args=lambda *a: tuple(a),
    samples=_bn_samples, no_fp64=("triton",))


# ----------------------------------------------------------------------------- bias + leaky relu
def _blr_samples(device, dtype):
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    out = []
    for shape, view, dim, slope, what in [((0, 3, 4, 4), None, 1, 0.2, "empty"), ((1, 1, 1, 1), None, 1, 0.0, "one"),
                                          ((7, 13, 5, 3), None, 1, 0.2, "NCHW"), ((4, 6, 3, 3), cl, 1, 0.2, "channels-last"),
                                          ((127, 5), None, 1, 0.0, "2-D"), ((3, 8, 4), lambda t: t[:, ::2], 1, 0.2, "step"),
                                          ((2, 3, 5), None, -1, 0.2, "dim=-1"), ((5, 4), None, 1, 1.0, "slope 1")]:
        C = (view or (lambda t: t))(torch.empty(shape)).shape[dim]  # channels after the view
        out.append(Sample(f"{what} {shape} dim={dim} slope={slope}",
                          [Arg(_r(*shape), view or (lambda t: t), grad=True), Arg(_r(C), grad=True), slope, dim],
                          grad_scale=max(1.0, (max(1, torch.Size(shape).numel()) / max(C, 1)) ** 0.5 / 4)))
    if _big(device):
        out.append(Sample("channels-last 4x127x8x8", [Arg(_r(4, 127, 8, 8), cl, grad=True), Arg(_r(127), grad=True),
                                                       0.2, 1], grad_scale=2))
    return out


def _blr_ref(x, b, slope, dim):
    d = dim % x.dim()
    return F.leaky_relu(x + b.view([-1 if i == d else 1 for i in range(x.dim())]), slope)


BIAS_LEAKY_RELU = OpSpec(
    "bias_leaky_relu",
    fn=lambda x, b, s, d, backend=None: gankern.bias_leaky_relu(x, b, s, d, backend=backend),
    ref=_blr_ref,
    schema_args=lambda x, b, s, d: (x, b, s, d),
    samples=_blr_samples)


# ----------------------------------------------------------------------------- bce with logits
_RED = {"none": 0, "mean": 1, "sum": 2}


def _bce_samples(device, dtype):
    out = []
    sizes = [0, 1, 7, 127] + ([1000, 1 << 20] if _big(device) else [])
    for i, n in enumerate(sizes):
        red = ("mean", "sum", "none")[i % 3]
        sc = max(1.0, n ** 0.5 / 4) if red != "none" else 1.0
        out.append(Sample(f"n={n} float target {red}", [Arg(_r(n, 3, scale=4), grad=True), 0.9, None, red, None],
                          scale=sc, nan_output=n == 0 and red == "mean"))
        out.append(Sample(f"n={n} tensor target + weights {red}",
                          [Arg(_r(n, 3, scale=4), grad=True), Arg(_r(n, 3, lo=0, hi=1), grad=True),
                           Arg(_r(3, lo=0, hi=1)), red, Arg(_r(3, lo=0.5, hi=1.5))], scale=sc,
                          nan_output=n == 0 and red == "mean"))
    out.append(Sample("transposed input, expanded target",
                      [Arg(_r(5, 8, scale=4), lambda t: t.t(), grad=True), Arg(_r(1, 1, lo=0, hi=1), lambda t: t.expand(8, 5)),
                       None, "mean", None], scale=2))
    return out


def _bce_ref(x, t, w, red, pw):
    if not isinstance(t, torch.Tensor):
        t = torch.full_like(x, t)
    return F.binary_cross_entropy_with_logits(x, t, w, reduction=red, pos_weight=pw)


def _bce_schema(x, t, w, red, pw):
    tensor = isinstance(t, torch.Tensor)
    return (x, t if tensor else None, 0.0 if tensor else float(t), w, pw, _RED[red])


BCE_WITH_LOGITS = OpSpec(
    "bce_with_logits",
    fn=lambda x, t, w, red, pw, backend=None: gankern.bce_with_logits(x, t, w, red, pw, backend=backend),
    ref=_bce_ref,
    schema_args=_bce_schema,
    samples=_bce_samples, no_fp64=("triton",))


OPS = {s.name: s for s in (LINEAR_LEAKY_RELU, BATCH_NORM_LEAKY_RELU, BIAS_LEAKY_RELU, BCE_WITH_LOGITS)}
