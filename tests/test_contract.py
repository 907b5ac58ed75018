"""One contract per op: a table of bad calls, run on every backend available here (cpp, triton under
TRITON_INTERPRET=1, reference), must raise the same exception type with the same message everywhere.

The checks exist once, in C++ (csrc/<op>.cpp): the public op checks before it runs an internal op (both
overloads, ``default`` and ``triton``), and the reference backend runs them through ``gankern::_<op>_check``;
what is Python-level (tensor argument types, reduction strings) is in the public function, before the backend.
(A non-tensor argument of the wrong type, e.g. ``dim=1.5``, gets the dispatcher's parser error, which names the
op that parsed it: ``_<op>_check`` on the reference backend; not in the table.)
"""
import math

import pytest
import torch

import gankern
from conftest import CPU_BACKENDS

pytestmark = pytest.mark.needs_ext  # the checks live in gankern._C

META = "meta"


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape).to(dtype).to(device) if device == "cpu" else torch.empty(*shape, dtype=dtype,
                                                                                         device=device)


def bias(backend, x=None, b=None, slope=0.2, dim=1):
    x = _t(2, 3, 4) if x is None else x
    b = _t(3) if b is None else b
    return gankern.bias_leaky_relu(x, b, slope, dim, backend=backend)


def bce(backend, x=None, t=None, w=None, reduction="mean", pw=None, grad=False):
    x = _t(4, 3) if x is None else x
    t = torch.rand(4, 3) if t is None else t
    if grad:
        x = x.detach().requires_grad_()
    return gankern.bce_with_logits(x, t, w, reduction, pw, backend=backend)


def linear(backend, x=None, w=None, b="default", slope=0.2):
    x = _t(6, 5) if x is None else x
    w = _t(4, 5) if w is None else w
    b = _t(4) if isinstance(b, str) else b
    return gankern.linear_leaky_relu(x, w, b, slope, backend=backend)


def bn(backend, x=None, rm="z", rv="o", w="o", b="z", training=True, momentum=0.1, eps=1e-5, slope=0.0):
    x = _t(4, 3) if x is None else x
    fill = {"z": lambda: torch.zeros(3), "o": lambda: torch.ones(3)}
    rm, rv, w, b = (fill[v]() if isinstance(v, str) and v in fill else v for v in (rm, rv, w, b))
    return gankern.batch_norm_leaky_relu(x, rm, rv, w, b, training, momentum, eps, slope, backend=backend)


CASES = {
    # bias_leaky_relu
    "bias: bias shape": lambda be: bias(be, b=_t(4)),
    "bias: bias 2-D": lambda be: bias(be, b=_t(3, 1)),
    "bias: bias dtype": lambda be: bias(be, b=_t(3, dtype=torch.float64)),
    "bias: bias on meta": lambda be: bias(be, b=_t(3, device=META)),
    "bias: int input": lambda be: bias(be, x=torch.ones(2, 3, dtype=torch.long), b=torch.ones(3, dtype=torch.long)),
    "bias: 0-d input": lambda be: bias(be, x=torch.tensor(1.0), b=_t(1)),
    "bias: dim too large": lambda be: bias(be, dim=3),
    "bias: dim too small": lambda be: bias(be, dim=-4),
    "bias: bias None": lambda be: gankern.bias_leaky_relu(_t(2, 3), None, backend=be),
    "bias: input a list": lambda be: gankern.bias_leaky_relu([1.0], _t(1), backend=be),
    # bce_with_logits
    "bce: target size": lambda be: bce(be, t=torch.rand(4, 2)),
    "bce: reduction": lambda be: bce(be, reduction="avg"),
    "bce: target a string": lambda be: bce(be, t="1"),
    "bce: int input": lambda be: bce(be, x=torch.ones(4, 3, dtype=torch.long), t=torch.ones(4, 3, dtype=torch.long)),
    "bce: weight shape": lambda be: bce(be, w=_t(5)),
    "bce: pos_weight shape": lambda be: bce(be, pw=_t(2, 4, 3)),
    "bce: target dtype": lambda be: bce(be, t=torch.rand(4, 3, dtype=torch.float64)),
    "bce: weight int": lambda be: bce(be, w=torch.ones(3, dtype=torch.long)),
    "bce: target on meta": lambda be: bce(be, t=_t(4, 3, device=META)),
    "bce: weight on meta": lambda be: bce(be, w=_t(3, device=META)),
    "bce: pos_weight on meta": lambda be: bce(be, pw=_t(3, device=META)),
    "bce: weight a list": lambda be: bce(be, w=[1.0, 2.0, 3.0]),
    "bce: weight requires grad": lambda be: bce(be, w=_t(3).requires_grad_(), grad=True),
    # linear_leaky_relu
    "linear: weight 1-D": lambda be: linear(be, w=_t(5)),
    "linear: 0-d input": lambda be: linear(be, x=torch.tensor(1.0)),
    "linear: int input": lambda be: linear(be, x=torch.ones(6, 5, dtype=torch.long),
                                           w=torch.ones(4, 5, dtype=torch.long), b=None),
    "linear: weight dtype": lambda be: linear(be, w=_t(4, 5, dtype=torch.float64)),
    "linear: weight on meta": lambda be: linear(be, w=_t(4, 5, device=META)),
    "linear: in_features": lambda be: linear(be, w=_t(4, 6)),
    "linear: bias shape": lambda be: linear(be, b=_t(5)),
    "linear: bias dtype": lambda be: linear(be, b=_t(4, dtype=torch.float64)),
    "linear: bias on meta": lambda be: linear(be, b=_t(4, device=META)),
    "linear: slope a string": lambda be: linear(be, slope="0.2"),
    "linear: bias a list": lambda be: linear(be, b=[0.0] * 4),
    # batch_norm_relu / batch_norm_leaky_relu
    "bn: 1-D input": lambda be: bn(be, x=_t(5), rm=torch.zeros(5), rv=torch.ones(5), w=None, b=None, training=False),
    "bn: running_mean shape": lambda be: bn(be, rm=torch.zeros(4), training=False),
    "bn: running_var 2-D": lambda be: bn(be, rv=torch.ones(2, 3), training=False),
    "bn: weight shape": lambda be: bn(be, w=torch.ones(4)),
    "bn: bias shape": lambda be: bn(be, b=torch.ones(2)),
    "bn: weight dtype": lambda be: bn(be, w=torch.ones(3, dtype=torch.float64)),
    "bn: mixed param dtypes": lambda be: bn(be, x=_t(4, 3, dtype=torch.float16), w=torch.ones(3, dtype=torch.float16)),
    "bn: weight on meta": lambda be: bn(be, w=_t(3, device=META)),
    "bn: running_mean on meta": lambda be: bn(be, rm=_t(3, device=META)),
    "bn: running_var on meta (eval)": lambda be: bn(be, rv=_t(3, device=META), training=False),
    "bn: int input": lambda be: bn(be, x=torch.ones(4, 3, dtype=torch.long), rm=None, rv=None, w=None, b=None),
    "bn: one value per channel": lambda be: bn(be, x=_t(1, 3)),
    "bn: one value per channel 4-D": lambda be: bn(be, x=_t(1, 3, 1, 1)),
    "bn: eval without stats": lambda be: bn(be, rm=None, rv=None, training=False),
    "bn: only running_mean": lambda be: bn(be, rv=None),
    "bn: momentum nan": lambda be: bn(be, momentum=math.nan),
    "bn: momentum inf": lambda be: bn(be, momentum=math.inf),
    "bn: eps negative": lambda be: bn(be, eps=-1e-5),
    "bn: eps nan": lambda be: bn(be, eps=math.nan),
    "bn: eps inf": lambda be: bn(be, eps=math.inf),
    "bn: negative slope": lambda be: bn(be, slope=-0.1),
    "bn: slope nan": lambda be: bn(be, slope=math.nan),
    "bn: weight a list": lambda be: bn(be, w=[1.0, 1.0, 1.0]),
    "bn: input a list": lambda be: gankern.batch_norm_relu([1.0, 2.0], None, None, training=True, backend=be),
}


def _outcome(fn, backend):
    try:
        fn(backend)
    except Exception as e:  # noqa: BLE001 -- the exception is what is compared
        # the dispatcher's argument-parser message names the overload's full schema on a "Declaration:" line
        msg = "\n".join(line for line in str(e).splitlines() if not line.startswith("Declaration:"))
        return type(e), msg
    return None, "no error"


@pytest.mark.parametrize("case", list(CASES))
def test_same_error_on_every_backend(case):
    fn = CASES[case]
    got = {be: _outcome(fn, be) for be in CPU_BACKENDS}
    first_be, first = next(iter(got.items()))
    assert first[0] is not None, f"{case}: backend {first_be} accepted it"
    for be, outcome in got.items():
        assert outcome == first, f"{case}: {be} raised {outcome}, {first_be} raised {first}"


def test_every_backend_is_compared():
    # the table means something only when more than one backend runs it
    assert "cpp" in CPU_BACKENDS and "reference" in CPU_BACKENDS
