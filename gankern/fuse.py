"""``gankern.fuse(model)``: swap torch layer pairs for gankern's fused layers, in place.

What is fused (the rule table ``RULES``: first module -> activation -> fused module)
-----------------------------------------------------------------------------------
* ``nn.Linear`` -> ``nn.LeakyReLU`` (any slope) or ``nn.ReLU`` (slope 0)  ->  ``gankern.nn.LinearLeakyReLU``
* ``nn.BatchNorm1d`` / ``2d`` -> ``nn.ReLU``  ->  ``gankern.nn.BatchNormReLU1d`` / ``2d``
* ``nn.BatchNorm1d`` / ``2d`` -> ``nn.LeakyReLU``  ->  ``gankern.nn.BatchNormLeakyReLU1d`` / ``2d`` (when this
  gankern has them; otherwise the report says so)
* ``nn.Conv2d`` / ``nn.ConvTranspose2d`` (with or without bias, ``padding_mode="zeros"``) -> ``nn.LeakyReLU`` /
  ``nn.ReLU``  ->  ``gankern.nn.Conv2dLeakyReLU`` / ``ConvTranspose2dLeakyReLU`` (the conv runs without its bias;
  ``gankern.bias_leaky_relu`` adds it and activates in one pass)

``Linear -> BatchNorm1d -> LeakyReLU`` (MLP generators) fuses its BatchNorm -> LeakyReLU pair.

"Directly followed" is found three ways:

1. inside an ``nn.Sequential`` (and subclasses that keep Sequential's ``forward``), at any depth:
   adjacent children;
2. inside any other module whose ``forward`` ``torch.fx`` can trace symbolically (all submodules as
   leaves; traced once in train and once in eval mode): a ``call_module`` of the first module
   whose only user is a ``call_module`` of the activation, where every call of either module in
   the model follows that pattern;
3. with ``trace=True`` only: in such a ``forward``, a ``call_module`` whose only user is an activation
   *function or method* (``F.leaky_relu(h, 0.2)``, ``F.relu``, ``torch.relu``, ``h.relu()``, in place or
   not).  Then ``forward`` itself is rewritten: the traced graph without the activation call becomes
   the instance's ``forward`` (the module keeps its class; ``unfuse`` deletes the rewritten forward).
   This needs one graph for train and eval mode (a ``forward`` that branches on ``self.training`` is
   left) and bakes in the Python the trace ran (as torch.fx always does).

How a pair is replaced (state_dict compatible)
----------------------------------------------
The fused module takes the *first* module's place (same attribute name / Sequential key) and a
module activation's place gets a ``FusedAway`` placeholder (an ``nn.Identity``).  The fused module
*reuses the same Parameter and buffer objects*, so ``state_dict`` keys and values are identical to
the unfused model's (checkpoints load both ways with ``strict=True``), train/eval mode, device and
dtype are carried over, and an optimizer created before ``fuse`` keeps updating the model.

Left as they are, each listed in the report with the reason and what would cover it: functional
activations without ``trace=True``; modules with hooks or parametrizations (e.g. ``spectral_norm``);
modules registered under several names; outputs also used elsewhere; a ``forward`` torch.fx cannot
trace (data-dependent control flow); pairs with no rule (``Conv1d`` + ``LeakyReLU``, ...); lazy modules not yet
initialised (``nn.LazyLinear``, ``nn.LazyBatchNorm1d``, ``nn.LazyConv2d``, ...: their shapes come from the first
forward, so run the model once on an example input, after which they are plain torch modules and fuse).

Report
------
``fuse`` returns the model and sets ``model.gankern_fuse_report`` (a ``FuseReport``: ``.fused`` /
``.skipped`` lists, ``.counts()``, ``.fraction()`` of the Linear/Conv/BatchNorm -> activation pairs fused,
``str()`` for a readable table).  ``unfuse(model)`` puts plain torch modules (and the class's own
``forward``) back, same Parameter objects, and sets ``model.gankern_unfuse_report``.

The code: ``_plan`` looks at the unmodified model and returns ``Plan`` entries and ``Skipped`` ones;
``_apply`` then performs the plans.  Activation kinds and how a pair was found are enums (``ActKind``,
``Via``); a traced child's single consumer is a ``_ToModule`` or ``_ToFunction``.
"""
from __future__ import annotations

import enum
import types
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from . import _backends
from . import nn as gnn

__all__ = ["fuse", "unfuse", "FuseReport", "FusedAway", "RULES", "Rule", "ActKind", "Via"]


class ActKind(str, enum.Enum):
    """The activations gankern fuses (the value is the torch module's name; a str, so ``rule.act == "ReLU"``)."""
    LEAKY_RELU = "LeakyReLU"
    RELU = "ReLU"


class Via(str, enum.Enum):
    """How a pair was found (``Fused.via`` holds the value)."""
    SEQUENTIAL = "Sequential"             # adjacent children of an nn.Sequential
    FX = "torch.fx"                       # a call_module followed by an activation module in a traced forward
    FX_REWRITE = "torch.fx rewrite"       # followed by an activation function (trace=True rewrites forward)


# ------------------------------------------------------------------ report types
@dataclass
class Fused:
    path: str          # where the fused module now is (the first module's path)
    kind: str          # the rule's kind, e.g. "Linear+LeakyReLU", "Conv2d+ReLU"
    activation: str    # path of the activation (now a FusedAway), or the function and the forward it was in
    via: str           # a Via's value: "Sequential", "torch.fx" or "torch.fx rewrite" (trace=True)


@dataclass
class Skipped:
    path: str          # module path ("" = the model itself)
    what: str          # e.g. "Conv1d -> LeakyReLU"
    reason: str        # why, and which flag or op would cover it
    pair: bool = False  # a Linear/Conv/BatchNorm directly followed by an activation


@dataclass
class FuseReport:
    """What ``gankern.fuse`` did: ``fused`` (list of Fused) and ``skipped`` (list of Skipped)."""
    fused: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    trace: bool = False

    def counts(self) -> dict:
        out: dict = {}
        for f in self.fused:
            out[f.kind] = out.get(f.kind, 0) + 1
        return out

    def fraction(self) -> float:
        """Fused pairs / (fused + unfused Linear/Conv/BatchNorm -> activation pairs); 1.0 when there are none."""
        left = sum(s.pair for s in self.skipped)
        total = len(self.fused) + left
        return len(self.fused) / total if total else 1.0

    def __str__(self) -> str:
        lines = [f"gankern.fuse: {len(self.fused)} fused, {len(self.skipped)} left unfused"
                 + ("" if self.trace else " (trace=False: activation functions in forward are not fused; "
                                         "gankern.fuse(model, trace=True) rewrites forward for them)")]
        for f in self.fused:
            lines.append(f"  fused  {f.kind:<22} at {f.path or '<model>'} (+ {f.activation}) via {f.via}")
        for s in self.skipped:
            lines.append(f"  left   {s.what} at {s.path or '<model>'}: {s.reason}")
        return "\n".join(lines)


class FusedAway(nn.Identity):
    """Placeholder left where an activation was fused into the preceding module (keeps indices/keys)."""

    def __init__(self, fused_into: str, original: nn.Module):
        super().__init__()
        self.fused_into = fused_into              # sibling name holding the fused module
        self.__dict__["_original"] = original     # not a registered submodule (for unfuse)

    def extra_repr(self) -> str:
        return f"fused into {self.fused_into!r}: {self._original!r}"


# ------------------------------------------------------------------ activations
@dataclass(frozen=True)
class Act:
    """An activation applied to a module's output: its kind, its slope, how it is written."""
    kind: ActKind
    slope: float
    desc: str


def _module_act(m) -> Act | None:
    if type(m) is nn.LeakyReLU:
        return Act(ActKind.LEAKY_RELU, float(m.negative_slope), "LeakyReLU")
    if type(m) is nn.ReLU:
        return Act(ActKind.RELU, 0.0, "ReLU")
    return None


_F_LEAKY = {F.leaky_relu: "F.leaky_relu", F.leaky_relu_: "F.leaky_relu_"}
_F_RELU = {F.relu: "F.relu", F.relu_: "F.relu_", torch.relu: "torch.relu", torch.relu_: "torch.relu_"}
_M_RELU = {"relu", "relu_"}


def _node_act(node) -> Act | None:
    """The activation a graph node applies to its first argument (a function or method call), or None."""
    extra = list(node.args[1:]) + list(node.kwargs.values())
    if any(isinstance(v, torch.fx.Node) for v in extra):
        return None
    if node.op == "call_function" and node.target in _F_RELU:
        return Act(ActKind.RELU, 0.0, _F_RELU[node.target])
    if node.op == "call_function" and node.target in _F_LEAKY:
        slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
        if isinstance(slope, bool) or not isinstance(slope, (int, float)):
            return None
        return Act(ActKind.LEAKY_RELU, float(slope), _F_LEAKY[node.target])
    if node.op == "call_method" and node.target in _M_RELU and len(node.args) == 1 and not node.kwargs:
        return Act(ActKind.RELU, 0.0, f".{node.target}()")
    return None


# ------------------------------------------------------------------ the rule table
def _share_state(src: nn.Module, dst: nn.Module) -> None:
    dst._parameters.clear()
    dst._parameters.update(src._parameters)
    dst._buffers.clear()
    dst._buffers.update(src._buffers)
    dst._non_persistent_buffers_set = set(src._non_persistent_buffers_set)
    dst.train(src.training)


def _bn_kwargs(a) -> dict:
    return dict(eps=a.eps, momentum=a.momentum, affine=a.affine, track_running_stats=a.track_running_stats,
                device="meta")


def _build_linear(a, slope, backend):
    f = gnn.LinearLeakyReLU(a.in_features, a.out_features, bias=a.bias is not None, negative_slope=slope,
                            device="meta", dtype=a.weight.dtype, backend=backend)
    _share_state(a, f)
    return f


def _build_bn_relu(a, slope, backend):
    cls = gnn.BatchNormReLU1d if type(a) is nn.BatchNorm1d else gnn.BatchNormReLU2d
    f = cls(a.num_features, **_bn_kwargs(a), bias=a.bias is not None, backend=backend)
    _share_state(a, f)
    return f


def _build_bn_leaky(a, slope, backend):
    cls = getattr(gnn, "BatchNormLeakyReLU1d" if type(a) is nn.BatchNorm1d else "BatchNormLeakyReLU2d")
    f = cls(a.num_features, **_bn_kwargs(a), negative_slope=slope, backend=backend)
    _share_state(a, f)
    return f


def _build_conv(a, slope, backend):
    cls = gnn.Conv2dLeakyReLU if type(a) is nn.Conv2d else gnn.ConvTranspose2dLeakyReLU
    return cls.from_conv(a, slope, backend)


def _check_none(a) -> str | None:
    return None


def _check_conv(a) -> str | None:
    if a.padding_mode != "zeros":
        return (f"padding_mode={a.padding_mode!r}: the fused conv supports 'zeros' only "
                "(gankern.bias_leaky_relu could still follow an explicit F.pad)")
    return None


@dataclass(frozen=True)
class Rule:
    """``first`` directly followed by an activation of kind ``act`` becomes ``gankern.nn.<fused>``."""
    first: type
    act: ActKind
    fused: str                                # class name in gankern.nn
    op: str                                   # the functional op it runs
    build: Callable                           # (first module, slope, backend) -> fused module sharing its tensors
    check: Callable = _check_none             # first module -> reason it cannot be fused, or None

    @property
    def kind(self) -> str:
        return f"{self.first.__name__}+{self.act.value}"

    def unavailable(self) -> str | None:
        if hasattr(gnn, self.fused):
            return None
        return (f"needs gankern.nn.{self.fused} (op gankern.{self.op}), which this gankern build does not have; "
                "a gankern with it fuses this pair")


_LEAKY, _RELU = ActKind.LEAKY_RELU, ActKind.RELU
RULES = tuple(
    [Rule(nn.Linear, act, "LinearLeakyReLU", "linear_leaky_relu", _build_linear) for act in (_LEAKY, _RELU)]
    + [Rule(bn, _RELU, f"BatchNormReLU{bn.__name__[-2:]}", "batch_norm_relu", _build_bn_relu)
       for bn in (nn.BatchNorm1d, nn.BatchNorm2d)]
    + [Rule(bn, _LEAKY, f"BatchNormLeakyReLU{bn.__name__[-2:]}", "batch_norm_leaky_relu", _build_bn_leaky)
       for bn in (nn.BatchNorm1d, nn.BatchNorm2d)]
    + [Rule(conv, act, f"{conv.__name__}LeakyReLU", "bias_leaky_relu", _build_conv, _check_conv)
       for conv in (nn.Conv2d, nn.ConvTranspose2d) for act in (_LEAKY, _RELU)])
_RULE = {(r.first, r.act): r for r in RULES}
_FIRSTS = {r.first for r in RULES}
# first modules whose pairs with an activation the report counts (fused or not)
_FAMILY = (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _rule_type(a: nn.Module) -> type:
    """The type the rule table knows ``a`` by: a lazy module (``nn.LazyLinear``, ...) not yet initialised is
    still its own class; it becomes ``cls_to_become`` (``nn.Linear``, ...) in its first forward."""
    if isinstance(a, LazyModuleMixin) and a.cls_to_become is not None:
        return a.cls_to_become
    return type(a)


def _has_rules(m: nn.Module) -> bool:
    return _rule_type(m) in _FIRSTS


def _lazy_reason(a: nn.Module, rule: Rule) -> str | None:
    if not isinstance(a, LazyModuleMixin):
        return None
    return (f"{type(a).__name__} is not initialised yet (a lazy module learns its shapes in its first forward); "
            f"run the model once on an example input, then gankern.fuse fuses it into "
            f"gankern.nn.{rule.fused}")


def _no_rule(a, act: Act) -> str:
    have = sorted(r.kind for r in RULES if r.first is _rule_type(a))
    also = f" (it fuses {', '.join(have)})" if have else ""
    return f"gankern has no fused {type(a).__name__}+{act.kind.value}{also}; no flag covers it"


# ------------------------------------------------------------------ unfuse table: fused module -> torch module
def _unmake_linear(f):
    m = nn.Linear(f.in_features, f.out_features, bias=f.bias is not None, device="meta")
    _share_state(f, m)
    return m


def _unmake_bn(f):
    cls = nn.BatchNorm1d if type(f).__name__.endswith("1d") else nn.BatchNorm2d
    if f.bias is not None:  # no bias= keyword: torch 2.11's BatchNorm has none
        m = cls(f.num_features, **_bn_kwargs(f))
    else:
        try:
            m = cls(f.num_features, **_bn_kwargs(f), bias=False)
        except TypeError:  # torch 2.11: a BatchNorm without bias is one whose bias Parameter is None
            m = cls(f.num_features, **_bn_kwargs(f))
            m.register_parameter("bias", None)
    _share_state(f, m)
    return m


def _unmakers() -> dict:
    out = {gnn.LinearLeakyReLU: _unmake_linear, gnn.BatchNormReLU1d: _unmake_bn, gnn.BatchNormReLU2d: _unmake_bn,
           gnn.Conv2dLeakyReLU: lambda f: f.to_conv(), gnn.ConvTranspose2dLeakyReLU: lambda f: f.to_conv()}
    for name in ("BatchNormLeakyReLU1d", "BatchNormLeakyReLU2d"):
        if hasattr(gnn, name):
            out[getattr(gnn, name)] = _unmake_bn
    return out


# ------------------------------------------------------------------ small helpers
def _tname(m) -> str:
    return type(m).__name__


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


def _has_hooks(m: nn.Module) -> bool:
    return any(getattr(m, d, None) for d in _HOOK_DICTS)


def _is_plain_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _traceable_owner(m: nn.Module, model: nn.Module) -> bool:
    """Modules whose own forward fuse traces: not plain Sequentials, torch's layers or containers."""
    if _is_plain_sequential(m) or not m._modules or isinstance(m, (nn.ModuleList, nn.ModuleDict)):
        return False
    if type(m).forward is nn.Module.forward:
        return False
    mod = type(m).__module__
    return m is model or not (mod.startswith("torch.nn") or mod.startswith("torch.ao.nn"))


# ------------------------------------------------------------------ planning
@dataclass
class Plan:
    parent: nn.Module
    ppath: str
    a_name: str
    rule: Rule
    act: Act
    via: Via
    b_name: str | None = None     # the activation module's name (None: a function in forward)


@dataclass
class _Ctx:
    model: nn.Module
    trace: bool
    multi: set                    # ids of modules registered under several names
    calls: dict = field(default_factory=dict)   # id(module) -> ids of traced owners whose forward calls it
    plans: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    graphs: dict = field(default_factory=dict)  # id(owner) -> its (train-mode) graph, for rewrites


def _pair_check(ctx: _Ctx, a: nn.Module, act: Act, b: nn.Module | None) -> tuple[Rule | None, str | None]:
    """(rule, None) if a followed by act can be fused, else (None, why not and what would cover it)."""
    rule = _RULE.get((_rule_type(a), act.kind))
    if rule is None:
        return None, _no_rule(a, act)
    why = rule.unavailable() or _lazy_reason(a, rule) or rule.check(a)
    if why is not None:
        return None, why
    for m in (a, b):
        if m is not None and _has_hooks(m):
            return None, f"{_tname(m)} has hooks (e.g. spectral_norm / weight_norm); fusing would drop them"
        if m is not None and id(m) in ctx.multi:
            return None, f"{_tname(m)} is registered under several names (shared module)"
    return rule, None


def _skip(ctx, path, a, act_desc, reason):
    what = _tname(a) if act_desc is None else f"{_tname(a)} -> {act_desc}"
    ctx.skipped.append(Skipped(path, what, reason, pair=act_desc is not None and isinstance(a, _FAMILY)))


def _plan_sequential(ctx: _Ctx, seq: nn.Sequential, spath: str) -> None:
    keys = [k for k, v in seq._modules.items() if v is not None]
    i = 0
    while i < len(keys):
        a = seq._modules[keys[i]]
        b = seq._modules[keys[i + 1]] if i + 1 < len(keys) else None
        act = _module_act(b) if b is not None else None
        i += 1
        if act is None:
            if _has_rules(a) and not isinstance(b, FusedAway):
                _skip(ctx, _join(spath, keys[i - 1]), a, None, "no activation follows it" if b is None else
                      f"followed by {_tname(b)}, not an activation gankern fuses (LeakyReLU / ReLU)")
            continue
        rule, why = _pair_check(ctx, a, act, b)
        if why is None and (ctx.calls.get(id(a)) or ctx.calls.get(id(b))):
            why = "a forward elsewhere calls this Sequential's member directly"
        if why is not None:
            _skip(ctx, _join(spath, keys[i - 1]), a, _tname(b), why)
            continue
        ctx.plans.append(Plan(seq, spath, keys[i - 1], rule, act, Via.SEQUENTIAL, keys[i]))
        i += 1


class _LeafTracer(torch.fx.Tracer):
    """Traces one module's own forward: every submodule is a leaf (a call_module node)."""

    def is_leaf_module(self, m, qualname):  # noqa: D401
        return True


def _trace_both_modes(owner: nn.Module):
    """Train- and eval-mode graphs of owner.forward, or raise (fx could not trace)."""
    graphs = []
    mode = owner.training
    try:
        for training in (True, False):
            owner.training = training   # only the owner's flag: children are leaves
            graphs.append(_LeafTracer().trace(owner))
    finally:
        owner.training = mode
    return graphs


@dataclass(frozen=True)
class _ToModule:
    """A child's output goes only to the child module ``name``."""
    name: str


@dataclass(frozen=True)
class _ToFunction:
    """A child's output goes only to an activation function or method call."""
    act: Act


@dataclass
class _GraphInfo:
    """What one traced graph says about each child (by name)."""
    follow: dict = field(default_factory=dict)      # a_name -> set of _ToModule / _ToFunction
    bad: dict = field(default_factory=dict)         # a_name -> reason
    act_inputs: dict = field(default_factory=dict)  # activation module name -> names of the modules feeding it
    attr_read: set = field(default_factory=set)     # activation modules whose attributes forward reads


def _user_desc(n) -> str:
    if n.op == "call_function":
        return getattr(n.target, "__name__", str(n.target))
    if n.op == "call_method":
        return f".{n.target}()"
    return n.target if n.op == "call_module" else n.op


def _note_module_call(info: _GraphInfo, owner: nn.Module, node) -> None:
    name, sub = node.target, owner._modules[node.target]
    if _module_act(sub) is not None:
        src = node.args[0] if node.args else None
        ok = src is not None and getattr(src, "op", None) == "call_module" and len(node.args) == 1 and not node.kwargs
        info.act_inputs.setdefault(name, set()).add(src.target if ok else None)
    if not isinstance(sub, _FAMILY) and not _has_rules(sub):
        return
    users = list(node.users)
    if len(users) != 1:
        info.bad[name] = f"its output is used by {len(users)} operations in forward"
        return
    u = users[0]
    fn_act = _node_act(u) if u.op in ("call_function", "call_method") else None
    if u.op == "call_module" and "." not in u.target and u.target in owner._modules:
        info.follow.setdefault(name, set()).add(_ToModule(u.target))
    elif fn_act is not None and u.args and u.args[0] is node:
        info.follow.setdefault(name, set()).add(_ToFunction(fn_act))
    else:
        info.bad[name] = f"followed by {_user_desc(u)}"


def _graph_info(ctx: _Ctx, owner: nn.Module, graph) -> _GraphInfo:
    info = _GraphInfo()
    for node in graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        try:
            sub = owner.get_submodule(node.target) if node.op == "call_module" else None
        except AttributeError:
            sub = None
        if sub is not None:
            ctx.calls.setdefault(id(sub), set()).add(id(owner))
        if node.op == "get_attr":
            head = node.target.split(".")[0]
            if head in owner._modules and _module_act(owner._modules[head]) is not None:
                info.attr_read.add(head)
        elif sub is not None and "." not in node.target:
            _note_module_call(info, owner, node)
    return info


def _plan_owner(ctx: _Ctx, owner: nn.Module, opath: str) -> None:
    """Trace owner.forward (train and eval mode) and plan its module -> activation pairs."""
    candidates = [n for n, c in owner._modules.items() if _has_rules(c) or isinstance(c, _FAMILY)]
    try:
        graphs = _trace_both_modes(owner)
    except Exception as e:  # noqa: BLE001 -- any tracing failure means: leave it alone
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        for n in candidates:
            if _has_rules(owner._modules[n]):
                _skip(ctx, _join(opath, n), owner._modules[n], None,
                      f"torch.fx cannot trace {_tname(owner)}.forward ({type(e).__name__}: {msg[:160]}); left untouched")
        return
    infos = [_graph_info(ctx, owner, g) for g in graphs]
    same_graph = graphs[0].python_code("self").src == graphs[1].python_code("self").src
    if same_graph:
        ctx.graphs[id(owner)] = graphs[0]
    for a_name in candidates:
        _plan_candidate(ctx, owner, opath, a_name, infos, same_graph)


def _plan_candidate(ctx: _Ctx, owner, opath, a_name, infos, same_graph) -> None:
    a, path = owner._modules[a_name], _join(opath, a_name)
    for info, mode in zip(infos, ("train", "eval")):
        if a_name in info.bad:
            if _has_rules(a):
                _skip(ctx, path, a, None, f"{info.bad[a_name]} (in {mode} mode)")
            return
    follows = [frozenset(info.follow.get(a_name, ())) for info in infos]
    if not follows[0] and not follows[1]:
        return  # not called by this forward
    if len(follows[0]) > 1 or len(follows[1]) > 1:
        _skip(ctx, path, a, "activation", "followed by different activations at different calls")
        return
    if follows[0] != follows[1]:
        _skip(ctx, path, a, "activation", "train and eval mode forwards differ after it")
        return
    (follower,) = follows[0]
    if isinstance(follower, _ToModule):
        _plan_module_follower(ctx, owner, opath, a_name, follower.name, infos)
    else:
        _plan_function_follower(ctx, owner, opath, a_name, follower.act, same_graph)


def _plan_module_follower(ctx, owner, opath, a_name, b_name, infos) -> None:
    a, b, path = owner._modules[a_name], owner._modules[b_name], _join(opath, a_name)
    act = _module_act(b)
    if act is None:
        if _has_rules(a):
            _skip(ctx, path, a, None, f"followed by {_tname(b)}, not an activation gankern fuses (LeakyReLU / ReLU)")
        return
    rule, why = _pair_check(ctx, a, act, b)
    if why is None and any(b_name in info.attr_read for info in infos):
        why = "forward reads an attribute of the activation"
    if why is None and any(info.act_inputs.get(b_name, {a_name}) != {a_name} for info in infos):
        why = f"the activation {b_name!r} is also applied to other values in forward"
    if why is not None:
        _skip(ctx, path, a, _tname(b), why)
        return
    ctx.plans.append(Plan(owner, opath, a_name, rule, act, Via.FX, b_name))


def _plan_function_follower(ctx, owner, opath, a_name, act: Act, same_graph: bool) -> None:
    a, path = owner._modules[a_name], _join(opath, a_name)
    rule, why = _pair_check(ctx, a, act, None)
    if why is None and not ctx.trace:
        why = (f"followed by the function {act.desc} in {_tname(owner)}.forward; fuse swaps modules only: "
               "gankern.fuse(model, trace=True) rewrites forward to fuse it")
    if why is None and not same_graph:
        why = (f"{_tname(owner)}.forward traces differently in train and eval mode; trace=True needs one graph "
               "(use nn.LeakyReLU / nn.ReLU modules there)")
    if why is not None:
        _skip(ctx, path, a, act.desc, why)
        return
    ctx.plans.append(Plan(owner, opath, a_name, rule, act, Via.FX_REWRITE))


def _drop_shared_calls(ctx: _Ctx) -> None:
    """Forward-found pairs are fused only when no other traced forward calls either module."""
    kept = []
    for p in ctx.plans:
        mods = [p.parent._modules[p.a_name]] + ([p.parent._modules[p.b_name]] if p.b_name else [])
        callers = set().union(*(ctx.calls.get(id(m), set()) for m in mods))
        if callers != {id(p.parent)}:
            _skip(ctx, _join(p.ppath, p.a_name), mods[0], p.act.desc, "another module's forward also calls it directly")
        else:
            kept.append(p)
    ctx.plans = kept


def _plan(model: nn.Module, trace: bool) -> _Ctx:
    """Look at the unmodified model: what to fuse (ctx.plans) and what is left and why (ctx.skipped)."""
    paths: dict = {}
    for pname, parent in model.named_modules(remove_duplicate=False):
        for cname, child in parent._modules.items():
            if child is not None:
                paths.setdefault(id(child), set()).add(_join(pname, cname))
    ctx = _Ctx(model, trace, {k for k, v in paths.items() if len(v) > 1})
    for opath, owner in model.named_modules():
        if _traceable_owner(owner, model):
            _plan_owner(ctx, owner, opath)
    _drop_shared_calls(ctx)
    for spath, seq in model.named_modules():
        if _is_plain_sequential(seq):
            _plan_sequential(ctx, seq, spath)
    return ctx


# ------------------------------------------------------------------ applying
def _rewrite_forward(owner: nn.Module, graph, names: list) -> None:
    """Drop the activation calls after ``names`` from owner's traced graph; make it the instance's forward."""
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target in names:
            (u,) = node.users
            u.replace_all_uses_with(node)
            graph.erase_node(u)
    graph.lint()
    code = graph.python_code(root_module="self")
    env = dict(code.globals)
    exec(compile(code.src, f"<gankern.fuse: {type(owner).__qualname__}.forward (traced)>", "exec"), env)  # noqa: S102
    owner.__dict__["forward"] = types.MethodType(env["forward"], owner)
    owner.__dict__["_gankern_rewritten"] = tuple(names)


def _apply(ctx: _Ctx, backend) -> FuseReport:
    report = FuseReport(trace=ctx.trace)
    rewrites: dict = {}
    for p in ctx.plans:
        a = p.parent._modules[p.a_name]
        p.parent._modules[p.a_name] = p.rule.build(a, p.act.slope, backend)
        if p.b_name is not None:
            b = p.parent._modules[p.b_name]
            placeholder = FusedAway(p.a_name, b)
            placeholder.train(b.training)
            p.parent._modules[p.b_name] = placeholder
            act = _join(p.ppath, p.b_name)
        else:
            rewrites.setdefault(id(p.parent), (p.parent, []))[1].append(p.a_name)
            act = f"{p.act.desc} in {_tname(p.parent)}.forward"
        report.fused.append(Fused(_join(p.ppath, p.a_name), p.rule.kind, act, p.via.value))
    for owner, names in rewrites.values():
        _rewrite_forward(owner, ctx.graphs[id(owner)], names)
    report.fused.sort(key=lambda f: f.path)
    report.skipped = sorted(ctx.skipped, key=lambda s: s.path)
    return report


def fuse(model, *, backend: str | None = None, trace: bool = False):
    """Replace the layer pairs of ``RULES`` in ``model`` with gankern's fused modules, in place; return
    ``model``.  ``backend`` is stored on each new fused module.  ``trace=True`` also fuses pairs whose
    activation is a function call in a torch.fx-traceable ``forward`` (by rewriting that forward).
    The report is ``model.gankern_fuse_report`` (see ``FuseReport``); see the module docstring."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"gankern.fuse expects a torch.nn.Module; got {type(model).__module__}.{type(model).__qualname__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("gankern.fuse cannot modify a TorchScript module; fuse the nn.Module before scripting it")
    if backend is not None and backend not in _backends._CHOICES:
        raise ValueError(f"backend must be one of {', '.join(map(repr, _backends._CHOICES))} or None; got {backend!r}")
    if not isinstance(trace, bool):
        raise TypeError(f"gankern.fuse: trace must be True or False; got {trace!r}")
    model.gankern_fuse_report = _apply(_plan(model, trace), backend)
    return model


# ------------------------------------------------------------------ unfuse
@dataclass
class UnfuseReport:
    restored: list = field(default_factory=list)   # paths of fused modules turned back into torch modules
    left: list = field(default_factory=list)       # (path, reason) of gankern modules left as they are


def _unfuse_parent(parent: nn.Module, ppath: str, unmakers: dict, rep: UnfuseReport, handled: set) -> None:
    for name, ph in list(parent._modules.items()):
        if not isinstance(ph, FusedAway):
            continue
        f = parent._modules.get(ph.fused_into)
        if type(f) in unmakers:
            parent._modules[ph.fused_into] = unmakers[type(f)](f)
            parent._modules[name] = ph._original
            handled.add(id(f))
            rep.restored.append(_join(ppath, ph.fused_into))
    names = parent.__dict__.pop("_gankern_rewritten", None)
    if names is not None:
        parent.__dict__.pop("forward", None)   # the class's own forward again
        for name in names:
            f = parent._modules.get(name)
            if type(f) in unmakers:
                parent._modules[name] = unmakers[type(f)](f)
                handled.add(id(f))
                rep.restored.append(_join(ppath, name))


def unfuse(model):
    """Undo ``fuse``: every pair it fused becomes the original torch modules again (the fused module's
    Parameter/buffer objects are reused; the activation module is the original object; a forward that
    ``trace=True`` rewrote is the class's own again).  gankern modules that ``fuse`` did not create (built
    directly) are left and listed in ``model.gankern_unfuse_report.left``.  Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"gankern.unfuse expects a torch.nn.Module; got {type(model).__module__}.{type(model).__qualname__}")
    rep = UnfuseReport()
    handled: set = set()
    unmakers = _unmakers()
    for ppath, parent in list(model.named_modules()):
        _unfuse_parent(parent, ppath, unmakers, rep, handled)
    for path, m in model.named_modules():
        if type(m) in unmakers and id(m) not in handled:
            rep.left.append((path, "built directly as a gankern module (no torch pair to restore)"))
    model.gankern_unfuse_report = rep
    if "gankern_fuse_report" in model.__dict__:
        del model.__dict__["gankern_fuse_report"]
    return model
