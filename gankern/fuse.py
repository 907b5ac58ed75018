"""``gankern.fuse(model)``: swap torch layer pairs for gankern's fused layers, in place.

What is fused
-------------
* ``nn.Linear`` directly followed by ``nn.LeakyReLU`` (any slope, ``inplace`` or not) -> ``gankern.nn.LinearLeakyReLU``
* ``nn.BatchNorm1d`` / ``nn.BatchNorm2d`` directly followed by ``nn.ReLU`` -> ``gankern.nn.BatchNormReLU1d`` / ``2d``

"Directly followed" is found two ways:

1. inside an ``nn.Sequential`` (and subclasses that keep Sequential's ``forward``), at any depth:
   adjacent children;
2. inside any other module whose ``forward`` ``torch.fx`` can trace symbolically (all submodules as
   leaves; traced once in train and once in eval mode): a ``call_module`` of the Linear/BatchNorm
   whose only user is a ``call_module`` of the activation, where every call of either module in
   the model follows that pattern.

How a pair is replaced (state_dict compatible)
----------------------------------------------
The fused module takes the *first* module's place (same attribute name / Sequential key) and the
activation's place gets a ``FusedAway`` placeholder (an ``nn.Identity``).  The fused module
*reuses the same Parameter and buffer objects* (weight, bias, running_mean, running_var,
num_batches_tracked), so

* ``state_dict`` keys and values are identical to the unfused model's (checkpoints load both ways
  with ``strict=True``), and the modules' train/eval mode, device and dtype are carried over;
* an optimizer created before ``fuse`` keeps updating the model (same Parameter objects).

Nothing else is touched: ``forward`` code is never rewritten.  Hence these are *left as they are*
and listed in the report with the reason: pairs whose activation is a function call in ``forward``
(``F.leaky_relu(self.fc(x))`` -- replacing it would need a rewritten forward), modules with hooks or
parametrizations (e.g. ``spectral_norm``), modules registered under several names, modules whose
output is also used elsewhere, modules inside a ``forward`` that torch.fx cannot trace (e.g.
data-dependent control flow), and pairs gankern has no fused op for (``Conv2d``+``LeakyReLU``,
``Linear``+``ReLU``, ``BatchNorm``+``LeakyReLU``, ...).

Limits: a ``forward`` of an untraceable module that reaches *into* a child (``self.seq[0](x)``)
cannot be seen; hooks registered after ``fuse`` on the old modules do not apply.

Report
------
``fuse`` returns the model and sets ``model.gankern_fuse_report`` (a ``FuseReport``:
``.fused`` / ``.skipped`` lists, ``.counts()``, ``str()`` for a readable table).
``unfuse(model)`` puts plain torch modules back (same Parameter objects) for every pair ``fuse``
made, and sets ``model.gankern_unfuse_report``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn

from . import _backends
from .nn import BatchNormReLU1d, BatchNormReLU2d, LinearLeakyReLU, _BatchNormReLU

__all__ = ["fuse", "unfuse", "FuseReport", "FusedAway"]

# first module type -> (activation type, fused module kind)
_PAIRS = {
    nn.Linear: (nn.LeakyReLU, "Linear+LeakyReLU"),
    nn.BatchNorm1d: (nn.ReLU, "BatchNorm1d+ReLU"),
    nn.BatchNorm2d: (nn.ReLU, "BatchNorm2d+ReLU"),
}
_ACTS = (nn.LeakyReLU, nn.ReLU)
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")
_FUNCTIONAL_ACTS = {torch.nn.functional.leaky_relu, torch.nn.functional.relu, torch.relu, torch.relu_,
                    torch.nn.functional.leaky_relu_, torch.nn.functional.relu_}
_METHOD_ACTS = {"relu", "relu_"}


@dataclass
class Fused:
    path: str          # where the fused module now is (the first module's path)
    kind: str          # "Linear+LeakyReLU", "BatchNorm1d+ReLU", "BatchNorm2d+ReLU"
    activation: str    # path of the activation, now a FusedAway placeholder
    via: str           # "Sequential" or "torch.fx"


@dataclass
class Skipped:
    path: str          # module path ("" = the model itself)
    what: str          # e.g. "Conv2d -> LeakyReLU"
    reason: str


@dataclass
class FuseReport:
    """What ``gankern.fuse`` did: ``fused`` (list of Fused) and ``skipped`` (list of Skipped)."""
    fused: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    def counts(self) -> dict:
        out: dict = {}
        for f in self.fused:
            out[f.kind] = out.get(f.kind, 0) + 1
        return out

    def __str__(self) -> str:
        lines = [f"gankern.fuse: {len(self.fused)} fused, {len(self.skipped)} left unfused"]
        for f in self.fused:
            lines.append(f"  fused  {f.kind:<18} at {f.path or '<model>'} (+ {f.activation}) via {f.via}")
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


def _tname(m) -> str:
    return type(m).__name__


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _has_hooks(m: nn.Module) -> bool:
    return any(getattr(m, d, None) for d in _HOOK_DICTS)


def _is_plain_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _has_forward(m: nn.Module) -> bool:
    return type(m).forward is not nn.Module.forward and not isinstance(m, (nn.ModuleList, nn.ModuleDict))


def _is_torch_leaf(m: nn.Module) -> bool:
    mod = type(m).__module__
    return mod.startswith("torch.nn") or mod.startswith("torch.ao.nn")


def _pair_reason(a: nn.Module, b: nn.Module | None, multi: set) -> str | None:
    """None if (a, b) can be fused, else why not."""
    ta = type(a)
    if ta not in _PAIRS:
        if b is not None and isinstance(b, _ACTS):
            return f"gankern has no fused {_tname(a)}+{_tname(b)} (only Linear+LeakyReLU, BatchNorm1d/2d+ReLU)"
        return "not fusible"
    act, kind = _PAIRS[ta]
    if b is None:
        return f"no activation follows it ({kind} needs {act.__name__} right after)"
    if type(b) is not act:
        if isinstance(b, _ACTS):
            return f"gankern has no fused {_tname(a)}+{_tname(b)} (only {kind})"
        return f"followed by {_tname(b)}, not {act.__name__}"
    for m in (a, b):
        if _has_hooks(m):
            return f"{_tname(m)} has hooks (e.g. spectral_norm / weight_norm); fusing would drop them"
        if id(m) in multi:
            return f"{_tname(m)} is registered under several names (shared module)"
    if isinstance(a, nn.modules.batchnorm._NormBase) and a.affine and a.weight is not None and \
            isinstance(a.weight, nn.parameter.UninitializedParameter):
        return "uninitialized (lazy) module"
    return None


def _make_fused(a: nn.Module, b: nn.Module, backend):
    """The fused module for (a, b), sharing a's Parameter and buffer objects."""
    ta = type(a)
    if ta is nn.Linear:
        f = LinearLeakyReLU(a.in_features, a.out_features, bias=a.bias is not None,
                            negative_slope=b.negative_slope, device="meta", dtype=a.weight.dtype, backend=backend)
    else:
        cls = BatchNormReLU1d if ta is nn.BatchNorm1d else BatchNormReLU2d
        f = cls(a.num_features, eps=a.eps, momentum=a.momentum, affine=a.affine,
                track_running_stats=a.track_running_stats, device="meta", bias=a.bias is not None, backend=backend)
    _share_state(a, f)
    return f


def _share_state(src: nn.Module, dst: nn.Module) -> None:
    dst._parameters.clear()
    dst._parameters.update(src._parameters)
    dst._buffers.clear()
    dst._buffers.update(src._buffers)
    dst._non_persistent_buffers_set = set(src._non_persistent_buffers_set)
    dst.train(src.training)


def _unmake(f: nn.Module) -> nn.Module:
    """Plain torch module equivalent of a gankern fused module (sharing its tensors)."""
    if isinstance(f, LinearLeakyReLU):
        m = nn.Linear(f.in_features, f.out_features, bias=f.bias is not None, device="meta")
    else:
        cls = nn.BatchNorm1d if isinstance(f, BatchNormReLU1d) else nn.BatchNorm2d
        m = cls(f.num_features, eps=f.eps, momentum=f.momentum, affine=f.affine,
                track_running_stats=f.track_running_stats, device="meta", bias=f.bias is not None)
    _share_state(f, m)
    return m


class _LeafTracer(torch.fx.Tracer):
    """Traces one module's own forward: every submodule is a leaf (a call_module node)."""

    def is_leaf_module(self, m, qualname):  # noqa: D401
        return True


def _trace_calls(owner: nn.Module):
    """Both modes' graphs of owner.forward, or raise (fx could not trace)."""
    graphs = []
    mode = owner.training
    try:
        for training in (True, False):
            owner.training = training   # only the owner's flag: children are leaves
            graphs.append(_LeafTracer().trace(owner))
    finally:
        owner.training = mode
    return graphs


def _user_desc(n) -> str:
    if n.op == "call_function":
        return getattr(n.target, "__name__", str(n.target))
    if n.op == "call_method":
        return f".{n.target}()"
    return n.op


def fuse(model, *, backend: str | None = None):
    """Replace Linear->LeakyReLU and BatchNorm1d/2d->ReLU pairs in ``model`` with gankern's fused
    modules, in place; return ``model``.  ``backend`` is stored on each new fused module.
    The report is ``model.gankern_fuse_report`` (see ``FuseReport``); see the module docstring for
    the rules."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"gankern.fuse expects a torch.nn.Module; got {type(model).__module__}.{type(model).__qualname__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("gankern.fuse cannot modify a TorchScript module; fuse the nn.Module before scripting it")
    if backend is not None and backend not in _backends._CHOICES:
        raise ValueError(f"backend must be one of {', '.join(map(repr, _backends._CHOICES))} or None; got {backend!r}")

    report = FuseReport()
    # Every registered (parent, name) of each module object: modules under several names are not fused.
    paths: dict = {}
    for pname, parent in model.named_modules(remove_duplicate=False):
        for cname, child in parent._modules.items():
            if child is not None:
                paths.setdefault(id(child), set()).add(_join(pname, cname))
    multi = {k for k, v in paths.items() if len(v) > 1}

    # 1. Trace every module with its own forward (not plain Sequentials / torch's own layers): who calls what.
    calls: dict = {}          # id(module) -> ids of the traced modules whose forward calls it
    fx_plans = []             # (owner, owner_path, a_name, b_name)
    for opath, owner in model.named_modules():
        if _is_plain_sequential(owner) or not _has_forward(owner) or (_is_torch_leaf(owner) and owner is not model) \
                or not owner._modules:
            continue
        candidates = [n for n, c in owner._modules.items() if type(c) in _PAIRS]
        try:
            graphs = _trace_calls(owner)
        except Exception as e:  # noqa: BLE001 -- any tracing failure means: leave it alone
            if candidates:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                for n in candidates:
                    report.skipped.append(Skipped(_join(opath, n), _tname(owner._modules[n]),
                                                  f"torch.fx cannot trace {_tname(owner)}.forward "
                                                  f"({type(e).__name__}: {msg[:160]}); left untouched"))
            continue
        per_graph_ok = []
        for gi, g in enumerate(graphs):
            ok: dict = {}     # a_name -> b_name if every call of a in this graph feeds exactly b
            bad: dict = {}    # a_name -> reason
            act_inputs: dict = {}  # b_name -> set of producers
            for node in g.nodes:
                if node.op == "get_attr" or node.op == "call_module":
                    target = node.target
                    try:
                        sub = owner.get_submodule(target) if node.op == "call_module" else None
                    except AttributeError:
                        sub = None
                    if sub is not None:
                        calls.setdefault(id(sub), set()).add(id(owner))
                    if node.op == "get_attr":
                        head = target.split(".")[0]
                        if head in owner._modules and isinstance(owner._modules[head], _ACTS):
                            bad["@" + head] = "forward reads an attribute of the activation"
                        continue
                    if "." in target or sub is None:
                        continue
                    if isinstance(sub, _ACTS):
                        src = node.args[0] if node.args else None
                        act_inputs.setdefault(target, set()).add(
                            src.target if (src is not None and getattr(src, "op", None) == "call_module"
                                           and len(node.args) == 1 and not node.kwargs) else None)
                    if type(sub) in _PAIRS:
                        users = list(node.users)
                        if len(users) != 1:
                            bad[target] = f"its output is used by {len(users)} operations in forward"
                            continue
                        u = users[0]
                        if u.op == "call_module" and "." not in u.target and u.target in owner._modules:
                            if ok.get(target, u.target) != u.target:
                                bad[target] = "followed by different activations at different calls"
                            ok[target] = u.target
                        elif (u.op == "call_function" and u.target in _FUNCTIONAL_ACTS) or \
                                (u.op == "call_method" and u.target in _METHOD_ACTS):
                            bad[target] = (f"followed by the function {_user_desc(u)} in forward; fuse only swaps "
                                           "submodules, it does not rewrite forward (use nn.LeakyReLU/nn.ReLU modules)")
                        else:
                            bad[target] = f"followed by {_user_desc(u) if u.op != 'call_module' else u.target}"
            per_graph_ok.append((ok, bad, act_inputs))
        # A pair is planned when both modes agree and the activation only ever consumes the module's output.
        for a_name in candidates:
            a = owner._modules[a_name]
            reasons = [f"{bad[a_name]} (in {mode} mode)" for (ok, bad, _), mode in zip(per_graph_ok, ("train", "eval"))
                       if a_name in bad]
            if reasons:
                report.skipped.append(Skipped(_join(opath, a_name), _tname(a), reasons[0]))
                continue
            targets = {ok.get(a_name) for ok, _, _ in per_graph_ok}
            if targets == {None}:
                if id(owner) not in calls.get(id(a), ()):
                    continue  # not called by this forward
                report.skipped.append(Skipped(_join(opath, a_name), _tname(a), "no activation module follows it"))
                continue
            if len(targets) != 1:
                report.skipped.append(Skipped(_join(opath, a_name), _tname(a),
                                              "train and eval mode forwards differ after it"))
                continue
            b_name = targets.pop()
            b = owner._modules[b_name]
            why = _pair_reason(a, b, multi)
            if why is None:
                if any(("@" + b_name) in bad for _, bad, _ in per_graph_ok):
                    why = "forward reads an attribute of the activation"
                elif any(ins.get(b_name, {a_name}) != {a_name} for _, _, ins in per_graph_ok):
                    why = f"the activation {b_name!r} is also applied to other values in forward"
            if why is not None:
                report.skipped.append(Skipped(_join(opath, a_name), f"{_tname(a)} -> {_tname(b)}", why))
                continue
            fx_plans.append((owner, opath, a_name, b_name))
    # Only fuse when no other traced forward calls either module (it would see the changed behaviour).
    kept = []
    for owner, opath, a_name, b_name in fx_plans:
        a, b = owner._modules[a_name], owner._modules[b_name]
        if calls.get(id(a), set()) | calls.get(id(b), set()) != {id(owner)}:
            report.skipped.append(Skipped(_join(opath, a_name), f"{_tname(a)} -> {_tname(b)}",
                                          "another module's forward also calls it directly"))
        else:
            kept.append((owner, opath, a_name, b_name))
    fx_plans = kept

    # 2. Sequentials: adjacent children.
    seq_plans = []
    for spath, seq in model.named_modules():
        if not _is_plain_sequential(seq):
            continue
        keys = [k for k, v in seq._modules.items() if v is not None]
        i = 0
        while i < len(keys):
            a = seq._modules[keys[i]]
            b = seq._modules[keys[i + 1]] if i + 1 < len(keys) else None
            interesting = type(a) in _PAIRS or (b is not None and isinstance(b, _ACTS))
            if not interesting:
                i += 1
                continue
            why = _pair_reason(a, b, multi)
            if why is None and (calls.get(id(a)) or calls.get(id(b))):
                why = "a forward elsewhere calls this Sequential's member directly"
            if why is None:
                seq_plans.append((seq, spath, keys[i], keys[i + 1]))
                i += 2
                continue
            if why != "not fusible":
                what = _tname(a) if b is None else f"{_tname(a)} -> {_tname(b)}"
                report.skipped.append(Skipped(_join(spath, keys[i]), what, why))
            i += 1

    # 3. Apply (analysis above ran on the unmodified model).
    for parent, ppath, a_name, b_name, via in ([p + ("Sequential",) for p in seq_plans] +
                                              [p + ("torch.fx",) for p in fx_plans]):
        a, b = parent._modules[a_name], parent._modules[b_name]
        fused = _make_fused(a, b, backend)
        parent._modules[a_name] = fused
        placeholder = FusedAway(a_name, b)
        placeholder.train(b.training)
        parent._modules[b_name] = placeholder
        report.fused.append(Fused(_join(ppath, a_name), _PAIRS[type(a)][1], _join(ppath, b_name), via))
    report.fused.sort(key=lambda f: f.path)
    report.skipped.sort(key=lambda s: s.path)
    model.gankern_fuse_report = report
    return model


@dataclass
class UnfuseReport:
    restored: list = field(default_factory=list)   # paths of fused modules turned back into torch pairs
    left: list = field(default_factory=list)       # (path, reason) of gankern modules left as they are


def unfuse(model):
    """Undo ``fuse``: every pair it fused becomes the original torch modules again (the fused module's
    Parameter/buffer objects are reused; the activation module is the original object).  gankern
    modules that ``fuse`` did not create (built directly) are left and listed in
    ``model.gankern_unfuse_report.left``.  Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"gankern.unfuse expects a torch.nn.Module; got {type(model).__module__}.{type(model).__qualname__}")
    rep = UnfuseReport()
    handled = set()
    for ppath, parent in list(model.named_modules()):
        for name, ph in list(parent._modules.items()):
            if not isinstance(ph, FusedAway):
                continue
            f = parent._modules.get(ph.fused_into)
            if not isinstance(f, (LinearLeakyReLU, _BatchNormReLU)):
                continue
            parent._modules[ph.fused_into] = _unmake(f)
            parent._modules[name] = ph._original
            handled.add(id(f))
            rep.restored.append(_join(ppath, ph.fused_into))
    for path, m in model.named_modules():
        if isinstance(m, (LinearLeakyReLU, _BatchNormReLU)) and id(m) not in handled:
            rep.left.append((path, "built directly as a gankern module (no torch pair to restore)"))
    model.gankern_unfuse_report = rep
    if "gankern_fuse_report" in model.__dict__:
        del model.__dict__["gankern_fuse_report"]
    return model
