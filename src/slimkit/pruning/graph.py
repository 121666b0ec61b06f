"""Channel dependency groups from a ``torch.fx`` trace.

Why torch.fx: it gives the real data flow between *named* modules (so every edit can be written down as
"module name -> kept indices" and replayed on a freshly built model without tracing again), it sees functional
ops (``x + y``, ``torch.cat``, ``flatten``, ``permute``) that hook-based tracing misses, and ``ShapeProp`` gives the
tensor shapes needed for flatten blocks and concat offsets. ``torch.export`` would give the same graph but lowers
modules to aten ops (losing module boundaries); the autograd graph loses ``view`` semantics.

Every tensor in the graph carries a *channel value*: the dim that holds channels and a list of segments
``(space, channels, block)`` (a concat has several segments; a flatten turns each channel into ``block``
consecutive features). Producers (Conv/Linear outputs, attention heads) open a new *space*; additions, concat
along other dims and multiplications unify spaces (union-find), so residual members share kept indices. An op the
walker does not understand *freezes* the spaces it touches: they are kept intact and listed with the op's name,
never pruned wrongly.
"""

from __future__ import annotations

import contextlib
import io
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from slimkit._inputs import tensors_of
from slimkit.errors import InputTypeError, UsageError
from slimkit.pruning.attention import PrunedMultiheadAttention

__all__ = [
    "Group",
    "Member",
    "PruneGraph",
    "Seg",
    "Value",
    "Walker",
    "build_graph",
    "register_graph_handler",
    "register_late",
    "run_late_registrations",
]

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
ELEMENTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.AlphaDropout,
    nn.Identity,
)
PASS_MODULES = (
    *ELEMENTWISE_MODULES,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.Upsample,
    nn.ZeroPad2d,
)
ELEMENTWISE_FUNCTIONS = {
    F.relu,
    F.relu6,
    F.gelu,
    F.silu,
    F.hardswish,
    F.hardsigmoid,
    F.sigmoid,
    F.tanh,
    F.leaky_relu,
    F.elu,
    F.mish,
    F.dropout,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.clone,
    torch.neg,
    operator.neg,
    torch.rsqrt,
    torch.erf,
}
PASS_FUNCTIONS = ELEMENTWISE_FUNCTIONS | {
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    F.avg_pool2d,
    F.max_pool2d,
    F.avg_pool1d,
    F.max_pool1d,
    F.interpolate,
    F.pad,
}
PASS_METHODS = {
    "relu",
    "relu_",
    "sigmoid",
    "tanh",
    "contiguous",
    "clone",
    "float",
    "to",
    "type_as",
    "detach",
    "sigmoid_",
    "clamp",
    "clamp_",
    "hardtanh_",
    "exp",
    "abs",
    "neg",
    "rsqrt",
}
BINARY = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.iadd,
    operator.imul,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.maximum,
    torch.minimum,
}
BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
SHAPE_QUERIES = {"size", "dim", "numel"}
MATMUL = {operator.matmul, torch.matmul}
HEAD_COUNT_NAMES = ("num_heads", "n_heads", "heads", "n_head", "nhead", "num_attention_heads")


@dataclass(frozen=True)
class Seg:
    """``channels`` channels of ``space``, each spread over ``block`` consecutive positions of the channel dim."""

    space: int
    channels: int
    block: int = 1


@dataclass
class Value:
    """A tensor's channel layout. ``heads``: the channel dim was split by a reshape into heads (on ``chdim``) and
    ``head_dim`` (on ``hdim``; ``None`` once contracted, e.g. attention scores) and, for a fused q/k/v projection,
    a part dim ``pdim`` (q, k, v)."""

    chdim: int | None
    segs: tuple[Seg, ...]
    heads: bool = False
    hdim: int | None = None
    pdim: int | None = None
    rdim: int | None = None  # a dim of size 1 inserted after the heads to repeat them (grouped-query attention)

    @property
    def dim(self) -> int:
        """The channel dim, for a value known to have one (``chdim`` is not None)."""
        if self.chdim is None:
            raise UsageError("pruning graph: a value without channels was used as one (a bug: please report it)")
        return self.chdim

    def moved(self, where: Callable[[int], int]) -> Value:
        """The same layout with every tracked dim ``d`` moved to ``where(d)``."""

        def move(d: int | None) -> int | None:
            return None if d is None else where(d)

        return Value(move(self.chdim), self.segs, self.heads, move(self.hdim), move(self.pdim), move(self.rdim))

    @property
    def width(self) -> int:
        return sum(s.channels * s.block for s in self.segs)


@dataclass
class Member:
    """One module touched by a group. ``role``: ``out`` (produces the channels), ``in`` (reads them at
    ``offset`` with ``block`` features per channel), ``through`` (norm/depthwise/PReLU indexed by channel) or
    ``heads`` (the inner q/k/v width of attention) or ``repeat`` (a key/value projection of grouped-query
    attention: it keeps head ``j`` when the group keeps the ``repeat`` query heads that read it; not scored)."""

    module: str
    role: str
    offset: int = 0
    block: int = 1
    copies: int = 1  # a fused q/k/v producer: its output is ``copies`` stacked copies of the group's channels
    repeat: int = 1  # role ``repeat``: query heads per key/value head


@dataclass
class Group:
    """Coupled channels: pruning channel ``i`` removes it from every member. ``unit`` channels form one
    prunable element (a GroupNorm group or an attention head)."""

    id: str
    size: int
    unit: int
    members: list[Member]
    modules: dict[str, nn.Module] = field(repr=False, default_factory=dict)
    attrs: list[tuple[str, str, int]] = field(default_factory=list)  # (module, int attribute, channels per count)
    params: list[tuple[str, int]] = field(default_factory=list)  # (parameter/buffer used in forward, channel dim)
    energy: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)  # consumer -> E[x^2] per input feature

    @property
    def units(self) -> int:
        return self.size // self.unit

    @property
    def names(self) -> list[str]:
        return list(dict.fromkeys(m.module for m in self.members))


@dataclass
class PruneGraph:
    """The traced model's groups (prunable ones) and what was kept intact (with the reason)."""

    groups: list[Group]
    kept_intact: list[dict]
    out_space: dict[str, int]  # module -> space of its output channels (producers)
    in_segs: dict[str, tuple[Seg, ...]]  # module -> segments of the channels it reads (consumers, through)
    heads_space: dict[str, int]
    group_of_space: dict[int, Group]
    root: Callable[[int], int] = field(repr=False, default=lambda space: space)
    out_copies: dict[str, int] = field(default_factory=dict)  # fused q/k/v producers: copies of the group
    head_ops: list[tuple[int, float]] = field(default_factory=list)  # (space, MACs) of q@k^T, attn@v matmuls
    head_splits: list[tuple[str, int, int, tuple]] = field(default_factory=list)  # reshapes using a head count
    params: dict[str, tuple[int, int]] = field(default_factory=dict)  # tensor used in forward -> (space, dim)
    out_repeat: dict[str, tuple[int, int]] = field(default_factory=dict)  # k/v projection -> (repeat, head_dim)


class _Spaces:
    """Union-find over channel spaces with sizes, units, frozen reasons and members."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.unit: list[int] = []
        self.frozen: dict[int, list[str]] = {}
        self.members: dict[int, list[Member]] = {}

    def new(self, size: int, frozen: str | None = None, unit: int = 1) -> int:
        sid = len(self.parent)
        self.parent.append(sid)
        self.size.append(size)
        self.unit.append(unit)
        self.members[sid] = []
        if frozen:
            self.frozen[sid] = [frozen]
        return sid

    def find(self, sid: int) -> int:
        while self.parent[sid] != sid:
            self.parent[sid] = self.parent[self.parent[sid]]
            sid = self.parent[sid]
        return sid

    def union(self, a: int, b: int, where: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            self.freeze(ra, f"{where}: channel counts differ ({self.size[ra]} vs {self.size[rb]})")
            self.freeze(rb, f"{where}: channel counts differ ({self.size[ra]} vs {self.size[rb]})")
            return
        self.parent[rb] = ra
        self.unit[ra] = math.lcm(self.unit[ra], self.unit[rb])
        self.members[ra] += self.members.pop(rb)
        if rb in self.frozen:
            self.frozen.setdefault(ra, []).extend(self.frozen.pop(rb))

    def freeze(self, sid: int, reason: str) -> None:
        root = self.find(sid)
        reasons = self.frozen.setdefault(root, [])
        if reason not in reasons:
            reasons.append(reason)


GraphHandler = Callable[["Walker", fx.Node, "Value | None"], object]
"""``handler(walker, node, x) -> value``: the channel value of ``node``'s output (a ``Value``, a tuple of them, or
``None`` for a non-tensor). ``x`` is the value of the node's first argument (see ``register_graph_handler``)."""


@dataclass(frozen=True)
class _Handler:
    fn: GraphHandler
    heads: bool
    stage: str


MODULE_HANDLERS: dict[type, _Handler] = {}
SCORING_VIEWS: dict[type, Callable[[nn.Module], nn.Module]] = {}  # how importance criteria see a layer type


def scoring_view(module: nn.Module) -> nn.Module:
    """``module`` as importance criteria read it (e.g. GPT-2's ``Conv1D`` as a Linear with its weight (out, in))."""
    view = SCORING_VIEWS.get(type(module))
    return module if view is None else view(module)


FUNCTION_HANDLERS: dict[object, _Handler] = {}
METHOD_HANDLERS: dict[str, _Handler] = {}
STAGES = ("node", "tensor", "channels")


_LATE: list[Callable[[], None]] = []


def register_late(add: Callable[[], None]) -> Callable[[], None]:
    """Register ``add``, which registers handlers (graph and surgery) for another library's layer types once that
    library is imported (``slimkit.pruning.hf``: transformers' ``Conv1D``); run before every trace and surgery, so
    the pruning modules never import the modules that extend them."""
    _LATE.append(add)
    return add


def run_late_registrations() -> None:
    for add in _LATE:
        add()


def register_graph_handler(
    *keys: object, heads: bool = False, stage: str = "channels"
) -> Callable[[GraphHandler], GraphHandler]:
    """Teach the pruning graph how channels flow through a module type, a function or a tensor method.

    ``keys`` are module classes (``nn.Linear``; a module of a registered class is not traced into, and the handler
    of the nearest registered base class applies to subclasses), functions (``torch.flatten``, ``operator.add``)
    or method names (``"view"``). The handler is called as ``handler(walker, node, x)`` and returns the output's
    channel value; ``walker`` offers ``read`` (the module reads channels), ``new_producer`` (it produces new
    channels), ``unknown`` (keep what the node touches intact, with a reason), ``flatten``, ``reshape``,
    ``permute``, ``shape`` and ``module_of``.

    Args:
        heads: the handler also accepts values split into attention heads (otherwise such a value is kept intact).
        stage: when it is called: ``"channels"`` (default) with ``x``, the tracked input whose channel dim is
            known; ``"tensor"`` (methods only) as soon as the tensor the method is called on is tracked; ``"node"``
            before any check, with ``x=None`` (the handler reads ``node.args`` itself).

    Example:
        >>> @register_graph_handler(MyLinear)                                           # doctest: +SKIP
        ... def my_linear(walker, node, x):
        ...     name, module = str(node.target), walker.module_of(node)
        ...     walker.read(name, x, "in")
        ...     return walker.new_producer(name, module.out_features, x.chdim)
    """
    if stage not in STAGES:
        raise UsageError(f"register_graph_handler: stage={stage!r} is not valid; choose one of {STAGES}")

    def wrap(fn: GraphHandler) -> GraphHandler:
        entry = _Handler(fn, heads, stage)
        for key in keys:
            if isinstance(key, type):
                MODULE_HANDLERS[key] = entry
            elif isinstance(key, str):
                METHOD_HANDLERS[key] = entry
            elif callable(key):
                FUNCTION_HANDLERS[key] = entry
            else:
                raise InputTypeError(f"register_graph_handler: {key!r} is no module class, function or method name")
        return fn

    return wrap


def module_handler(module: nn.Module) -> _Handler | None:
    """The handler of the nearest registered class of ``module`` (its own class first)."""
    for cls in type(module).__mro__:
        entry = MODULE_HANDLERS.get(cls)
        if entry is not None:
            return entry
    return None


def _fname(node: fx.Node) -> str:
    return str(node.target) if isinstance(node.target, str) else getattr(node.target, "__name__", "fn")


def _arg(node: fx.Node, index: int, key: str, default: object = None) -> Any:
    """Positional argument ``index`` of ``node`` (after the tensor), else keyword ``key``, else ``default``."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(key, default)


class Walker:
    """Walks a traced graph once, in order, giving every node's output a channel ``Value`` (see the module
    docstring). The isinstance knowledge lives in the handler tables (``register_graph_handler``)."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule) -> None:
        self.model, self.gm = model, gm
        self.modules = dict(model.named_modules())
        self.sp = _Spaces()
        self.env: dict[fx.Node, object] = {}
        self.out_space: dict[str, int] = {}
        self.in_segs: dict[str, tuple[Seg, ...]] = {}
        self.heads_space: dict[str, int] = {}
        self.order: dict[int, int] = {}
        self.copies: dict[int, tuple[int, int]] = {}  # fused producer space -> (heads space, parts)
        self.head_attrs: dict[int, set[tuple[str, str, int]]] = {}
        self.head_ops: list[tuple[int, float]] = []
        self.head_splits: list[tuple[str, int, int, tuple[int, ...]]] = []  # (node, space, heads dim, shape)
        self.params: dict[str, tuple[int, int]] = {}  # per-channel parameter read in forward -> (space, dim)
        self.attr_uses: dict[str, dict[int, tuple[Seg, ...]] | None] = {}  # get_attr target -> segs per dim
        self.repeats: list[tuple[int, int, int, int]] = []  # (k/v space, repeated space, repeat, head_dim)

    # -- values -------------------------------------------------------------------------------------------------
    @staticmethod
    def shape(node: object) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def dims(self, node: object) -> tuple[int, ...]:
        """The shape of a node known to be a tensor (ShapeProp annotated it)."""
        shape = self.shape(node)
        if shape is None:
            raise UsageError(f"pruning graph: no tensor shape recorded for {node} (a bug: please report it)")
        return shape

    def module_of(self, node: fx.Node) -> Any:
        """The module a ``call_module`` node calls (``Any``: handlers read attributes of their own layer type)."""
        return self.modules[str(node.target)]

    def fresh(self, node: fx.Node, reason: str | None) -> Value | None:
        shape = self.shape(node)
        if shape is None:
            return None
        if len(shape) < 2:
            return Value(None, ())
        return Value(1, (Seg(self.sp.new(shape[1], reason), shape[1]),))

    def made(self, node: fx.Node) -> Value | None:
        return self.fresh(node, f"tensor made in forward ({node.name})")

    def freeze(self, value: object, reason: str) -> None:
        if isinstance(value, Value):
            for seg in value.segs:
                self.sp.freeze(seg.space, reason)
        elif isinstance(value, (list, tuple)):
            for v in value:
                self.freeze(v, reason)

    def values_in(self, node: fx.Node) -> list[object]:
        found: list[object] = []

        def collect(n: fx.Node) -> fx.Node:
            found.append(self.env.get(n))
            return n

        fx.node.map_arg((node.args, node.kwargs), collect)
        return [v for v in found if v is not None]

    def unify(self, a: Value, b: Value, where: str) -> None:
        if [(s.channels, s.block) for s in a.segs] == [(s.channels, s.block) for s in b.segs]:
            for sa, sb in zip(a.segs, b.segs):
                self.sp.union(sa.space, sb.space, where)
        else:
            self.freeze(a, f"{where}: channel layouts differ")
            self.freeze(b, f"{where}: channel layouts differ")

    def unknown(self, node: fx.Node, what: str) -> Value | None:
        reason = f"unsupported {what} ({node.name})"
        for value in self.values_in(node):
            self.freeze(value, reason)
        return self.fresh(node, reason)

    def new_producer(self, name: str, size: int, chdim: int, role: str = "out", unit: int = 1) -> Value:
        sid = self.sp.new(size, unit=unit)
        self.sp.members[sid].append(Member(name, role))
        self.order[sid] = len(self.order)
        spaces = self.heads_space if role == "heads" else self.out_space
        if name in spaces:  # a module called twice has one weight: both calls keep the same channels
            self.sp.union(spaces[name], sid, f"module {name!r} called more than once")
        else:
            spaces[name] = sid
        return Value(chdim, (Seg(sid, size),))

    def read(self, name: str, value: Value, role: str) -> None:
        if name in self.in_segs:  # a module called twice reads the same channels both times
            self.unify(Value(0, self.in_segs[name]), value, f"module {name!r} called more than once")
            return
        offset = 0
        for seg in value.segs:
            self.sp.members[self.sp.find(seg.space)].append(Member(name, role, offset, seg.block))
            offset += seg.channels * seg.block
        self.in_segs[name] = value.segs

    # -- walk ---------------------------------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.env[node] = self.fresh(node, "model input")
            elif node.op == "get_attr":
                self.env[node] = self.attr_value(node)
            elif node.op == "output":
                for value in self.values_in(node):
                    self.freeze(value, "model output")
            elif node.op == "call_module":
                self.env[node] = self.call_module(node)
            elif node.op == "call_function":
                self.env[node] = self.call_function(node)
            else:  # call_method
                self.env[node] = self.call_method(node)

    def attr_value(self, node: fx.Node) -> Value | None:
        """A parameter read in forward (``x * self.scale.view(1, -1, 1, 1)``): with one dim wider than 1 it is a
        per-channel tensor, sliced with the channels it broadcasts onto; anything wider, and buffers (torch.fx
        bakes what is computed from a buffer into constants it cannot follow), are kept intact."""
        shape = self.shape(node)
        if shape is None:
            return None
        target = str(node.target)
        try:
            tensor: torch.Tensor | None = self.model.get_parameter(target)
        except AttributeError:
            tensor = None
        wide = [d for d, n in enumerate(shape) if n > 1]
        if tensor is None or len(wide) > 1 or not tensor.is_floating_point():
            self.attr_uses[target] = None
            return self.fresh(node, f"parameter/buffer used directly ({target})")
        if not wide:
            self.attr_uses[target] = {}
            return Value(None, ())
        dim = wide[0]
        if target not in self.params:
            self.params[target] = (self.sp.new(shape[dim]), dim)
        segs = (Seg(self.params[target][0], shape[dim]),)
        self.attr_uses[target] = {dim: segs}
        return Value(dim, segs)

    def arg_value(self, node: fx.Node, index: int = 0) -> Value | None:
        arg = node.args[index] if len(node.args) > index else None
        value = self.env.get(arg) if isinstance(arg, fx.Node) else None
        return value if isinstance(value, Value) else None

    def call_module(self, node: fx.Node) -> object:
        name, module = str(node.target), self.module_of(node)
        x = self.arg_value(node)
        kind = type(module).__name__
        if x is None or x.chdim is None:
            return self.unknown(node, f"input to {kind} {name!r}")
        entry = module_handler(module)
        if x.heads and not (entry is not None and entry.heads):
            return self.unknown(node, f"{kind} {name!r} on attention heads")
        if entry is None:
            return self.unknown(node, f"module {kind} {name!r} (kept intact)")
        return entry.fn(self, node, x)

    def call_function(self, node: fx.Node, *, lookup: bool = True) -> object:
        entry = FUNCTION_HANDLERS.get(node.target) if lookup else None
        fname = _fname(node)
        if not (entry is not None and entry.heads) and any(
            v.heads for v in self.values_in(node) if isinstance(v, Value)
        ):
            return self.unknown(node, f"function {fname} on attention heads")
        if entry is not None and entry.stage != "channels":
            return entry.fn(self, node, None)
        x = self.arg_value(node)
        if x is None:
            return self.made(node) if not self.values_in(node) else self.unknown(node, f"function {fname}")
        if x.chdim is None:  # a tensor without channels (a scalar parameter): what comes of it has none either
            return Value(None, ()) if len(self.values_in(node)) == 1 else self.unknown(node, f"function {fname}")
        if entry is None:
            return self.unknown(node, f"function {fname}")
        return entry.fn(self, node, x)

    def call_method(self, node: fx.Node) -> object:
        method = str(node.target)
        entry = METHOD_HANDLERS.get(method)
        if entry is not None and entry.stage == "node":
            return entry.fn(self, node, None)
        x = self.arg_value(node)
        if x is None:
            return self.made(node) if not self.values_in(node) else self.unknown(node, f"method .{method}()")
        if entry is not None and entry.stage == "tensor":
            return entry.fn(self, node, x)
        if x.chdim is None:
            return Value(None, ()) if len(self.values_in(node)) == 1 else self.unknown(node, f"method .{method}()")
        if x.heads and not (entry is not None and entry.heads):
            return self.unknown(node, f"method .{method}() on attention heads")
        if entry is None:
            return self.unknown(node, f"method .{method}()")
        return entry.fn(self, node, x)

    def at_dim(self, node: fx.Node, x: Value, dim: int, shape: tuple[int, ...]) -> Value | None:
        """``x`` with channels on ``dim``; a fully frozen value (e.g. the model input) is re-read there."""
        if x.chdim == dim:
            return x
        if all(self.sp.find(s.space) in self.sp.frozen for s in x.segs):
            return Value(dim, (Seg(self.sp.new(shape[dim], "model input"), shape[dim]),))
        return None

    def conv(self, node: fx.Node, name: str, module: Any, x: Value) -> Value | None:
        kind = type(module).__name__
        if module.groups == 1:
            self.read(name, x, "in")
            return self.new_producer(name, module.out_channels, 1)
        # Grouped (depthwise: one channel per group): whole groups are removed. Group k's input channels and
        # output channels go together, so with in == out the conv passes its channels through, and the group
        # of channels it belongs to moves in units of in_channels / groups (as for GroupNorm).
        per = module.in_channels // module.groups
        offsets = [0]
        for seg in x.segs:
            offsets.append(offsets[-1] + seg.channels * seg.block)
        if module.in_channels != module.out_channels:
            return self.unknown(
                node,
                f"grouped {kind} {name!r} with in_channels {module.in_channels} != "
                f"out_channels {module.out_channels} (groups={module.groups}, kept intact)",
            )
        if per > 1 and any(s.block != 1 or s.channels % per or o % per for s, o in zip(x.segs, offsets)):
            return self.unknown(node, f"grouped {kind} {name!r} whose groups straddle concatenated inputs")
        self.read(name, x, "through")
        for seg in x.segs:
            root = self.sp.find(seg.space)
            self.sp.unit[root] = math.lcm(self.sp.unit[root], per)
        return x

    def attention(self, node: fx.Node, name: str, module: Any) -> tuple[Value, Value]:
        reason = f"embedding dim of MultiheadAttention {name!r} (residual stream kept)"
        for value in self.values_in(node):
            self.freeze(value, reason)
        shape = self.dims(node.args[0])
        embed = Value(len(shape) - 1, (Seg(self.sp.new(module.embed_dim, reason), module.embed_dim),))
        weights = Value(None, ())
        if (
            getattr(module, "_qkv_same_embed_dim", True)
            and getattr(module, "bias_k", None) is None
            and not getattr(module, "add_zero_attn", False)
            and module.num_heads > 1
        ):
            inner = module.num_heads * module.head_dim
            self.new_producer(name, inner, len(shape) - 1, role="heads", unit=module.head_dim)
        return (embed, weights)

    def flatten(self, node: fx.Node, x: Value, shape: tuple[int, ...], start: int, end: int) -> Value | None:
        ndim = len(shape)
        start, end = start % ndim, end % ndim
        if x.dim < start:
            return x
        if x.dim > end:
            return Value(x.dim - (end - start), x.segs)
        if x.dim != start:
            return self.unknown(node, "flatten that interleaves channels")
        inner = math.prod(shape[start + 1 : end + 1])
        return Value(start, tuple(Seg(s.space, s.channels, s.block * inner) for s in x.segs))

    def reshape(self, node: fx.Node, x: Value, sizes: Any) -> Value | None:
        src, dst = self.dims(node.args[0]), self.dims(node)
        c = x.dim
        if x.heads:
            if src == dst and len(sizes) == len(dst) and sizes[c] == -1:  # view(B, -1, T, D) of (B, H, T, D)
                return x
            if x.rdim == c + 1:
                return self.repeat_heads(node, x, src, dst)
            return self.merge_heads(node, x, sizes, src, dst)
        literal = sizes[c] if len(sizes) > c else None
        if dst[: c + 1] == src[: c + 1]:
            if isinstance(literal, int) and literal != -1:
                return self.unknown(node, f"reshape with a literal channel count {literal}")
            if isinstance(literal, fx.Node) and not self.follows(literal, x):
                return self.unknown(node, f"reshape with a channel count computed elsewhere ({literal.name})")
            return x
        # merge of dims [c, e] into one (a flatten written as view/reshape)
        for end in range(c + 1, len(src)):
            if dst == (*src[:c], math.prod(src[c : end + 1]), *src[end + 1 :]):
                if isinstance(literal, int) and literal != -1:
                    return self.unknown(node, f"reshape with a literal feature count {literal}")
                return self.flatten(node, x, src, c, end)
        moved = self.unit_dims(node, x, sizes, src, dst)
        if moved is not None:
            return moved
        split = self.split_heads(node, x, sizes, src, dst)
        return split if split is not None else self.unknown(node, f"reshape {src} -> {dst} that splits channels")

    def unit_dims(
        self, node: fx.Node, x: Value, sizes: Any, src: tuple[int, ...], dst: tuple[int, ...]
    ) -> Value | None:
        """A reshape that only adds or removes dims of size 1 (``scale.view(1, -1, 1, 1)``): the channels move to
        the matching dim. ``None`` when the reshape does more."""
        if src[x.dim] == 1 or [n for n in src if n != 1] != [n for n in dst if n != 1]:
            return None
        rank = sum(n != 1 for n in src[: x.dim])
        c = [d for d, n in enumerate(dst) if n != 1][rank]
        literal = sizes[c] if len(sizes) == len(dst) else None
        if isinstance(literal, int) and literal != -1:
            return self.unknown(node, f"reshape with a literal channel count {literal}")
        if isinstance(literal, fx.Node) and not self.follows(literal, x):
            return self.unknown(node, f"reshape with a channel count computed elsewhere ({literal.name})")
        return Value(c, x.segs)

    def follows(self, arg: fx.Node, x: Value) -> bool:
        """``arg`` (a reshape size) is ``t.size(d)`` / ``t.shape[d]`` of a tensor whose channels on ``d`` are
        ``x``'s channels, so it follows whatever is kept."""
        src = idx = None
        if arg.op == "call_method" and arg.target == "size" and len(arg.args) == 2:
            src, idx = arg.args
        elif arg.op == "call_function" and arg.target is operator.getitem and isinstance(arg.args[0], fx.Node):
            base = arg.args[0]
            if (base.op == "call_function" and base.target is getattr and base.args[1:] == ("shape",)) or (
                base.op == "call_method" and base.target == "size" and len(base.args) == 1
            ):
                src, idx = base.args[0], arg.args[1]
        value = self.env.get(src) if isinstance(src, fx.Node) else None
        if not isinstance(value, Value) or value.heads or value.chdim is None or not isinstance(idx, int):
            return False

        def layout(v: Value) -> list[tuple[int, int, int]]:
            return [(self.sp.find(seg.space), seg.channels, seg.block) for seg in v.segs]

        return idx % len(self.dims(src)) == value.chdim and layout(value) == layout(x)

    def binary(self, node: fx.Node, where: str) -> Value | None:
        out_shape = self.shape(node)
        if out_shape is None:
            return None
        tensors: list[tuple[fx.Node, Value]] = []
        for arg in node.args[:2]:
            value = self.env.get(arg) if isinstance(arg, fx.Node) else None
            if isinstance(arg, fx.Node) and isinstance(value, Value):
                tensors.append((arg, value))
        if not tensors:
            return self.made(node)
        if any(v.heads for _, v in tensors):
            return self.heads_binary(node, tensors, out_shape, where)
        base = next((v for a, v in tensors if len(self.dims(a)) == len(out_shape) and v.chdim is not None), None)
        if base is None:
            return self.unknown(node, where)
        for arg, value in tensors:
            if value is base:
                continue
            shape = self.dims(arg)
            aligned = base.dim - (len(out_shape) - len(shape))
            if aligned < 0 or shape[aligned] == 1:
                continue
            if value.chdim != aligned:
                self.freeze(value, f"{where} ({node.name}) broadcasts across channels")
                self.freeze(base, f"{where} ({node.name}) broadcasts across channels")
            else:
                self.unify(base, value, f"{where} ({node.name})")
        return base

    # -- attention heads (plain q/k/v Linear attention) ---------------------------------------------------------
    def softmax(self, node: fx.Node, x: Value, dim: Any) -> Value | None:
        dim = (-1 if dim is None else dim) % len(self.dims(node.args[0]))
        if dim in (x.chdim, x.hdim, x.pdim):
            return self.unknown(node, "softmax over channels")
        return x

    def unbind(self, node: fx.Node, x: Value, dim: Any) -> object:
        dim %= len(self.dims(node.args[0]))
        if not x.heads or dim != x.pdim:
            return self.unknown(node, "unbind of channels" if x.heads else "unbind")
        part = x.moved(lambda d: d - (d > dim))
        part.pdim = None
        return tuple(Value(part.chdim, part.segs, True, part.hdim) for _ in range(self.dims(node.args[0])[dim]))

    def head_count_attr(self, node: fx.Node, heads: int) -> tuple[str, str] | None:
        """The int attribute (``num_heads``...) of the module that owns ``node`` whose value is the literal head
        count of a reshape: updating it keeps the reshape right after heads are removed."""
        return self.int_attr(node, heads, HEAD_COUNT_NAMES)

    def int_attr(self, node: fx.Node, value: int, names: tuple[str, ...]) -> tuple[str, str] | None:
        """``(owner, attribute)``: the one int attribute of the module that owns ``node`` equal to ``value`` (one of
        ``names`` where several are), or None."""
        stack = node.meta.get("nn_module_stack") or {}
        owner = list(stack.values())[-1][0] if stack else ""  # no stack: the root module's own forward
        module = self.modules.get(owner)
        if module is None:
            return None
        found = [k for k, v in vars(module).items() if type(v) is int and v == value and not k.startswith("_")]
        if len(found) > 1:
            found = [k for k in found if k in names]
        return (owner, found[0]) if len(found) == 1 else None

    def split_heads(
        self, node: fx.Node, x: Value, sizes: Any, src: tuple[int, ...], dst: tuple[int, ...]
    ) -> Value | None:
        """``reshape(B, N, [parts,] heads, head_dim)`` of a projection's output: a heads value, or None."""
        c, k = x.dim, len(dst) - len(src) + 1
        if (
            k not in (2, 3)
            or len(x.segs) != 1
            or x.segs[0].block != 1
            or dst[:c] != src[:c]
            or dst[c + k :] != src[c + 1 :]
            or len(sizes) != len(dst)
        ):
            return None
        parts, heads, head_dim = (dst[c] if k == 3 else 1), dst[c + k - 2], dst[c + k - 1]
        p_arg, h_arg, d_arg = (sizes[c] if k == 3 else 1), sizes[c + k - 2], sizes[c + k - 1]
        if any(isinstance(a, fx.Node) or not isinstance(a, int) for a in (p_arg, h_arg, d_arg)):
            return self.unknown(
                node,
                f"reshape into attention heads with a computed size {sizes} (write the "
                "head count and head_dim as module attributes or -1)",
            )
        if heads == 1 or head_dim == 1:
            return None
        attr = None
        if h_arg != -1:
            attr = self.head_count_attr(node, heads)
            if attr is None:
                return self.unknown(
                    node,
                    f"reshape with a literal head count {heads} that is no int attribute "
                    "of the module (cannot be rewritten)",
                )
        space = x.segs[0].space
        if parts > 1:
            target = self.sp.new(heads * head_dim, unit=head_dim)
            self.copies[space] = (target, parts)
        else:
            target = self.sp.find(space)
            self.sp.unit[target] = math.lcm(self.sp.unit[target], head_dim)
        if attr is not None:
            self.head_attrs.setdefault(target, set()).add((*attr, head_dim))
            self.head_splits.append((node.name, target, c + k - 2, dst))
        seg = (Seg(target, heads * head_dim),)
        return Value(c + k - 2, seg, True, c + k - 1, c if k == 3 else None)

    def merge_heads(
        self, node: fx.Node, x: Value, sizes: Any, src: tuple[int, ...], dst: tuple[int, ...]
    ) -> Value | None:
        """``(..., heads, head_dim, ...) -> (..., heads * head_dim, ...)`` back into channels."""
        c = x.dim
        if (
            x.hdim != c + 1
            or x.pdim is not None
            or x.rdim is not None
            or dst != (*src[:c], src[c] * src[c + 1], *src[c + 2 :])
            or dst[c] != x.width
        ):
            return self.unknown(node, f"reshape {src} -> {dst} of attention heads")
        arg = sizes[c] if len(sizes) > c else None
        if arg != -1:
            return self.unknown(
                node,
                f"reshape of attention heads back to a fixed width ({arg}); write -1 so "
                "the width follows the kept heads",
            )
        return Value(c, x.segs)

    def repeat_heads(self, node: fx.Node, x: Value, src: tuple[int, ...], dst: tuple[int, ...]) -> Value | None:
        """``(B, kv, n_rep, T, D) -> (B, kv * n_rep, T, D)`` (``repeat_kv`` of grouped-query attention): the
        repeated heads are a new space whose units of ``n_rep`` heads each map to one key/value head."""
        c, hdim = x.dim, x.hdim
        if (
            hdim is None
            or hdim <= c + 1
            or x.pdim is not None
            or len(x.segs) != 1
            or dst != (*src[:c], src[c] * src[c + 1], *src[c + 2 :])
            or x.width != src[c] * src[hdim]
        ):
            return self.unknown(node, f"reshape {src} -> {dst} repeating attention heads")
        repeat, head_dim = src[c + 1], src[hdim]
        space = self.sp.new(dst[c] * head_dim, unit=repeat * head_dim)
        self.repeats.append((x.segs[0].space, space, repeat, head_dim))
        return Value(c, (Seg(space, dst[c] * head_dim),), True, hdim - 1)

    def heads_binary(
        self, node: fx.Node, tensors: list[tuple[fx.Node, Value]], out_shape: tuple[int, ...], where: str
    ) -> Value | None:
        base = next((v for a, v in tensors if v.heads and len(self.dims(a)) == len(out_shape)), None)
        if base is None:
            return self.unknown(node, f"{where} broadcasting attention heads")
        for arg, value in tensors:
            shape = self.dims(arg)
            if value is base:
                continue
            if (
                value.heads
                and len(shape) == len(out_shape)
                and (value.chdim, value.hdim, value.pdim) == (base.chdim, base.hdim, base.pdim)
            ):
                for a, b in zip(base.segs, value.segs):
                    self.sp.union(a.space, b.space, f"{where} ({node.name})")
                continue
            lead = len(out_shape) - len(shape)
            if value.heads or any(
                d is not None and d - lead >= 0 and shape[d - lead] != 1 for d in (base.chdim, base.pdim, base.rdim)
            ):
                return self.unknown(node, f"{where} mixing attention heads with other channels")
            if base.hdim is not None and base.hdim - lead >= 0 and shape[base.hdim - lead] != 1:
                # the same vector for every head (rotary cos/sin): fine, head_dim is never cut
                self.freeze(value, f"{where} ({node.name}) broadcast onto head_dim")
        return base

    def matmul(self, node: fx.Node, where: str) -> Value | None:
        a, b = self.arg_value(node, 0), self.arg_value(node, 1)
        if a is None or b is None or not (a.heads and b.heads):
            return self.unknown(node, f"{where} (only q @ k^T and attn @ v of attention heads are tracked)")
        sa, sb, out = self.dims(node.args[0]), self.dims(node.args[1]), self.dims(node)
        nd = len(out)
        batch = nd - 2
        ok = (
            len(sa) == len(sb) == nd
            and a.chdim == b.chdim
            and a.chdim is not None
            and a.chdim < batch
            and a.pdim is None is b.pdim
        )
        a_free = a.hdim == nd - 2  # head_dim survives on the rows of a
        b_free = b.hdim == nd - 1  # ... or on the columns of b
        contracted = (a.hdim == nd - 1, b.hdim == nd - 2)
        if (
            not ok
            or contracted[0] != contracted[1]
            or (a_free and b_free)
            or (a.hdim is not None and not (a_free or contracted[0]))
            or (b.hdim is not None and not (b_free or contracted[1]))
        ):
            return self.unknown(node, f"{where} of attention heads in an unsupported layout")
        for x, y in zip(a.segs, b.segs):
            self.sp.union(x.space, y.space, f"{where} ({node.name})")
        self.head_ops.append((a.segs[0].space, float(math.prod(out) * sa[-1])))
        return Value(a.chdim, a.segs, True, nd - 2 if a_free else nd - 1 if b_free else None)

    def sdpa(self, node: fx.Node) -> Value | None:
        found = [self.arg_value(node, i) for i in range(3)]
        mask = _arg(node, 3, "attn_mask")
        rest = [v for k, v in node.kwargs.items() if k != "attn_mask"] + list(node.args[4:])
        extra = any(isinstance(v, fx.Node) for v in rest) or bool(node.kwargs.get("enable_gqa"))
        nd = len(self.dims(node))
        values = [v for v in found if v is not None]
        if isinstance(mask, fx.Node) and values and values[0].chdim is not None:
            # a mask broadcast over the heads (size 1 there) is the same for every kept head
            shape, lead = self.dims(mask), nd - len(self.dims(mask))
            heads_at = values[0].chdim - lead
            extra = extra or (heads_at >= 0 and shape[heads_at] != 1)
            self.freeze(self.env.get(mask), f"attention mask ({mask.name})")
        if (
            extra
            or len(values) != len(found)
            or any(not v.heads or v.hdim != nd - 1 or v.pdim is not None or v.chdim != values[0].chdim for v in values)
        ):
            return self.unknown(node, "scaled_dot_product_attention (with a mask, or not on attention heads)")
        for v in values[1:]:
            self.sp.union(values[0].segs[0].space, v.segs[0].space, f"scaled_dot_product_attention ({node.name})")
        q, k = self.dims(node.args[0]), self.dims(node.args[1])
        self.head_ops.append((values[0].segs[0].space, float(2 * math.prod(q) * k[-2])))  # q @ k^T and attn @ v
        return values[2]

    def unsqueeze(self, node: fx.Node, x: Value, dim: Any) -> Value | None:
        if not isinstance(dim, int):
            return self.unknown(node, "unsqueeze at a computed dim")
        dim %= len(self.dims(node))
        return Value(x.dim + (dim <= x.dim), x.segs)

    def getitem(self, node: fx.Node) -> object:
        source = self.env.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        index: Any = node.args[1]
        if isinstance(source, tuple):
            return source[index]
        if not isinstance(source, Value):
            return self.made(node) if self.shape(node) is not None else None
        if source.chdim is None:
            return self.made(node)
        index = index if isinstance(index, tuple) else (index,)
        if source.heads:
            return self.index_heads(node, source, index)
        if any(i is Ellipsis or isinstance(i, fx.Node) for i in index):
            return self.unknown(node, "indexing")
        out_dim = src_dim = 0  # walk the index: None adds a dim, an int drops one, a slice keeps one
        for i in index:
            if i is None:
                out_dim += 1
                continue
            if src_dim == source.chdim:
                if i != slice(None):
                    return self.unknown(node, "indexing into channels")
                return Value(out_dim, source.segs)
            out_dim += not isinstance(i, int)
            src_dim += 1
        return Value(out_dim + source.chdim - src_dim, source.segs)

    def index_heads(self, node: fx.Node, source: Value, index: tuple) -> Value | None:
        """Indexing a value split into heads: whole heads only; slicing head_dim (rotary's halves), an int on
        the q/k/v part dim, and ``None`` right after the heads (``repeat_kv``) are followed."""
        ndim = len(self.dims(node.args[0]))
        if sum(i is Ellipsis for i in index) > 1 or any(isinstance(i, fx.Node) for i in index):
            return self.unknown(node, "indexing into attention heads")
        if Ellipsis in index:
            at = index.index(Ellipsis)
            used = sum(i is not None for i in index) - 1
            index = (*index[:at], *[slice(None)] * (ndim - used), *index[at + 1 :])
        index = (*index, *[slice(None)] * (ndim - sum(i is not None for i in index)))
        where: dict[int, int] = {}  # source dim -> output dim
        inserted: list[int] = []
        src = out = 0
        for i in index:
            if i is None:
                inserted.append(out)
                out += 1
                continue
            if isinstance(i, int):
                if src != source.pdim:
                    return self.unknown(node, "indexing into attention heads")
            elif not isinstance(i, slice) or (i != slice(None) and src not in (source.hdim,)):
                return self.unknown(node, "indexing into attention heads")
            else:
                where[src] = out
                out += 1
            src += 1

        def move(d: int | None) -> int | None:
            return None if d is None else where.get(d)

        result = Value(move(source.chdim), source.segs, True, move(source.hdim), move(source.pdim), move(source.rdim))
        if inserted:
            if result.chdim is None or inserted != [result.chdim + 1] or result.rdim is not None:
                return self.unknown(node, "indexing that adds dims to attention heads")
            result.rdim = inserted[0]
        return result

    def expand(self, node: fx.Node, x: Value) -> Value | None:
        """``expand`` that keeps every tracked dim's size (it may grow a repeat dim or broadcast dims)."""
        src, dst = self.dims(node.args[0]), self.dims(node)
        lead = len(dst) - len(src)
        if any(d is not None and dst[d + lead] != src[d] for d in (x.chdim, x.hdim, x.pdim)):
            return self.unknown(node, "expand of channels")
        return x.moved(lambda d: d + lead)

    def split(self, node: fx.Node, x: Value, size: Any, dim: Any) -> object:
        """``qkv.split(width, dim=-1)`` of a fused projection into equal parts: like a reshape into parts, each
        part is the same channels of one shared space (``copies`` of the producer)."""
        shape = self.dims(node.args[0])
        dim = dim % len(shape)
        if dim != x.chdim:
            return tuple(x for _ in node.meta.get("tensor_meta") or ())
        width = shape[dim]
        if not isinstance(size, int) or width % size or len(x.segs) != 1 or x.segs[0].block != 1 or size == width:
            return self.unknown(node, "split of channels")
        target = self.sp.new(size)
        self.copies[x.segs[0].space] = (target, width // size)
        attr = self.int_attr(node, size, ("split_size",))
        if attr is not None and "split" in attr[1]:  # GPT-2's split_size: rewritten to the kept part width
            self.head_attrs.setdefault(target, set()).add((*attr, 1))
        # otherwise the size is computed from attributes the surgery rewrites (num_heads * head_dim), or the
        # pruned model fails its check run on the example input, naming the layers (never a silently wrong model)
        return tuple(Value(dim, (Seg(target, size),)) for _ in range(width // size))

    def cat(self, node: fx.Node) -> Value | None:
        given: Any = node.args[0]
        tensors: Any = [t for t in given if not (isinstance(t, fx.Node) and 0 in (self.shape(t) or (1,)))]
        dim: Any = _arg(node, 1, "dim", 0)
        if len(tensors) == 1:  # a cache of no entries yet, concatenated with the new keys
            value = self.env.get(tensors[0])
            return value if isinstance(value, Value) else self.unknown(node, "torch.cat of an untracked tensor")
        found = [self.env.get(t) for t in tensors]
        heads = [v for v in found if isinstance(v, Value) and v.heads]
        if heads:
            first = heads[0]
            layout = (first.chdim, first.hdim, first.pdim, first.rdim)
            out_dim = dim % len(self.dims(node))
            if len(heads) != len(found) or any((v.chdim, v.hdim, v.pdim, v.rdim) != layout for v in heads):
                return self.unknown(node, "torch.cat mixing attention heads with other tensors")
            if out_dim in (first.chdim, first.pdim, first.rdim):
                return self.unknown(node, "torch.cat of attention heads along the heads")
            for other in heads[1:]:
                self.sp.union(first.segs[0].space, other.segs[0].space, f"torch.cat ({node.name})")
            return first
        values = [v for v in found if isinstance(v, Value) and v.chdim is not None]
        if len(values) != len(found) or not values:
            return self.unknown(node, "torch.cat of untracked tensors")
        out_ndim = len(self.dims(node))
        dim %= out_ndim
        if any(v.chdim != values[0].chdim for v in values):
            return self.unknown(node, "torch.cat of tensors with different channel dims")
        if dim == values[0].chdim:
            return Value(dim, tuple(s for v in values for s in v.segs))
        for other in values[1:]:
            self.unify(values[0], other, f"torch.cat ({node.name})")
        return values[0]

    def permute(self, node: fx.Node, x: Value, how: str, args: Any) -> Value:
        ndim = len(self.dims(node))
        if how == "transpose":
            a, b = (int(args[0]) % ndim, int(args[1]) % ndim)
            return x.moved(lambda d: b if d == a else a if d == b else d)
        dims = list(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else list(args)
        dims = [d % ndim for d in dims]
        return x.moved(dims.index)

    def reduce(self, node: fx.Node, x: Value, dim: Any) -> Value | None:
        if dim is None:
            return self.unknown(node, "reduction over all dims")
        ndim = len(self.dims(node.args[0]))
        dims = [d % ndim for d in (dim if isinstance(dim, (tuple, list)) else [dim])]
        if x.chdim in dims:
            return self.unknown(node, "reduction over channels")
        keep = len(self.dims(node)) == ndim
        return Value(x.chdim if keep else x.chdim - sum(d < x.chdim for d in dims), x.segs)


# -- the built-in handlers: how channels flow through torch's own layers, functions and methods ------------------
def _same(walker: Walker, node: fx.Node, x: Value | None) -> object:
    """Elementwise ops and pooling keep the channel layout."""
    return x


def _channels(x: Value | None) -> Value:
    if x is None:  # a "channels" stage handler is only called with a tracked value
        raise UsageError("pruning graph: a channel handler was called without its input (a bug: please report it)")
    return x


register_graph_handler(*ELEMENTWISE_MODULES, heads=True)(_same)
register_graph_handler(*(m for m in PASS_MODULES if m not in ELEMENTWISE_MODULES))(_same)
register_graph_handler(*ELEMENTWISE_FUNCTIONS, heads=True)(_same)
register_graph_handler(*(f for f in PASS_FUNCTIONS if f not in ELEMENTWISE_FUNCTIONS))(_same)
register_graph_handler(*PASS_METHODS, heads=True)(_same)


@register_graph_handler(nn.Softmax, nn.LogSoftmax, heads=True)
def _softmax_module(walker: Walker, node: fx.Node, x: Value | None) -> object:
    dim = getattr(walker.module_of(node), "dim", None)
    return walker.softmax(node, _channels(x), dim if dim is not None else -1)


@register_graph_handler(nn.Flatten)
def _flatten_module(walker: Walker, node: fx.Node, x: Value | None) -> object:
    module = walker.module_of(node)
    return walker.flatten(node, _channels(x), walker.dims(node.args[0]), module.start_dim, module.end_dim)


@register_graph_handler(*BATCH_NORMS, *INSTANCE_NORMS)
def _norm(walker: Walker, node: fx.Node, x: Value | None) -> object:
    if isinstance(walker.module_of(node), BATCH_NORMS) or getattr(walker.module_of(node), "affine", False):
        walker.read(str(node.target), _channels(x), "through")
    return x


@register_graph_handler(nn.PReLU)
def _prelu(walker: Walker, node: fx.Node, x: Value | None) -> object:
    if int(getattr(walker.module_of(node), "num_parameters", 1)) > 1:
        walker.read(str(node.target), _channels(x), "through")
    return x


@register_graph_handler(nn.GroupNorm)
def _group_norm(walker: Walker, node: fx.Node, x: Value | None) -> object:
    x, name, module = _channels(x), str(node.target), walker.module_of(node)
    if x.chdim != 1 or len(x.segs) != 1:
        return walker.unknown(node, f"GroupNorm {name!r} on a concatenated/flattened input")
    walker.read(name, x, "through")
    root = walker.sp.find(x.segs[0].space)
    walker.sp.unit[root] = math.lcm(walker.sp.unit[root], int(module.num_channels) // int(module.num_groups))
    return x


@register_graph_handler(nn.LayerNorm)
def _layer_norm(walker: Walker, node: fx.Node, x: Value | None) -> object:
    x, name, module = _channels(x), str(node.target), walker.module_of(node)
    if x.chdim != len(walker.dims(node.args[0])) - 1 or len(getattr(module, "normalized_shape", ())) != 1:
        return walker.unknown(node, f"LayerNorm {name!r} over several dims")
    walker.read(name, x, "through")
    return x


@register_graph_handler(nn.Linear)
def _linear(walker: Walker, node: fx.Node, x: Value | None) -> object:
    name, module, shape = str(node.target), walker.module_of(node), walker.dims(node.args[0])
    at = walker.at_dim(node, _channels(x), len(shape) - 1, shape)
    if at is None:
        return walker.unknown(node, f"Linear {name!r} applied to a non-channel dim")
    walker.read(name, at, "in")
    return walker.new_producer(name, int(module.out_features), len(shape) - 1)


@register_graph_handler(*CONVS, *TRANSPOSED)
def _conv(walker: Walker, node: fx.Node, x: Value | None) -> object:
    name, module, shape = str(node.target), walker.module_of(node), walker.dims(node.args[0])
    at = walker.at_dim(node, _channels(x), 1, shape)
    if at is None:
        return walker.unknown(node, f"{type(module).__name__} {name!r} input")
    return walker.conv(node, name, module, at)


@register_graph_handler(nn.MultiheadAttention, PrunedMultiheadAttention)
def _attention(walker: Walker, node: fx.Node, x: Value | None) -> object:
    return walker.attention(node, str(node.target), walker.module_of(node))


@register_graph_handler(getattr, heads=True, stage="node")
def _getattr(walker: Walker, node: fx.Node, x: Value | None) -> object:
    if node.args[1:] == ("shape",):
        return None
    return walker.call_function(node, lookup=False)


@register_graph_handler(operator.getitem, heads=True, stage="node")
def _getitem(walker: Walker, node: fx.Node, x: Value | None) -> object:
    return walker.getitem(node)


@register_graph_handler(*MATMUL, heads=True, stage="node")
def _matmul(walker: Walker, node: fx.Node, x: Value | None) -> object:
    return walker.matmul(node, _fname(node))


@register_graph_handler(F.scaled_dot_product_attention, heads=True, stage="node")
def _sdpa(walker: Walker, node: fx.Node, x: Value | None) -> object:
    return walker.sdpa(node)


@register_graph_handler(*BINARY, heads=True, stage="node")
def _binary(walker: Walker, node: fx.Node, x: Value | None) -> object:
    return walker.binary(node, _fname(node))


@register_graph_handler(torch.cat, torch.concat, heads=True, stage="node")
def _cat(walker: Walker, node: fx.Node, x: Value | None) -> object:
    return walker.cat(node)


@register_graph_handler(torch.flatten)
def _flatten(walker: Walker, node: fx.Node, x: Value | None) -> object:
    return walker.flatten(
        node, _channels(x), walker.dims(node.args[0]), _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)
    )


@register_graph_handler(torch.reshape, heads=True)
def _reshape(walker: Walker, node: fx.Node, x: Value | None) -> object:
    return walker.reshape(node, _channels(x), _arg(node, 1, "shape"))


@register_graph_handler(torch.permute, torch.transpose, heads=True)
def _permute(walker: Walker, node: fx.Node, x: Value | None) -> object:
    return walker.permute(node, _channels(x), _fname(node), node.args[1:])


@register_graph_handler(torch.mean, torch.sum, torch.amax)
def _reduce(walker: Walker, node: fx.Node, x: Value | None) -> object:
    return walker.reduce(node, _channels(x), _arg(node, 1, "dim"))


@register_graph_handler(torch.softmax, F.softmax, heads=True)
@register_graph_handler(F.log_softmax)
def _softmax(walker: Walker, node: fx.Node, x: Value | None) -> object:
    return walker.softmax(node, _channels(x), _arg(node, 1, "dim"))


@register_graph_handler(torch.unbind, heads=True)
def _unbind(walker: Walker, node: fx.Node, x: Value | None) -> object:
    return walker.unbind(node, _channels(x), _arg(node, 1, "dim", 0))


@register_graph_handler(torch.unsqueeze)
def _unsqueeze(walker: Walker, node: fx.Node, x: Value | None) -> object:
    return walker.unsqueeze(node, _channels(x), _arg(node, 1, "dim"))


@register_graph_handler(*SHAPE_QUERIES, stage="node")
def _shape_query(walker: Walker, node: fx.Node, x: Value | None) -> object:
    return None


@register_graph_handler(*BINARY_METHODS, stage="tensor")
def _binary_method(walker: Walker, node: fx.Node, x: Value | None) -> object:
    return walker.binary(node, str(node.target))


@register_graph_handler("matmul", stage="tensor")
def _matmul_method(walker: Walker, node: fx.Node, x: Value | None) -> object:
    return walker.matmul(node, "matmul")


@register_graph_handler("flatten")
def _flatten_method(walker: Walker, node: fx.Node, x: Value | None) -> object:
    return walker.flatten(
        node, _channels(x), walker.dims(node.args[0]), _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)
    )


@register_graph_handler("view", "reshape", heads=True)
def _reshape_method(walker: Walker, node: fx.Node, x: Value | None) -> object:
    rest = node.args[1:]
    sizes = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
    return walker.reshape(node, _channels(x), list(sizes))


@register_graph_handler("permute", "transpose", heads=True)
def _permute_method(walker: Walker, node: fx.Node, x: Value | None) -> object:
    return walker.permute(node, _channels(x), str(node.target), node.args[1:])


@register_graph_handler("mean", "sum", "amax")
def _reduce_method(walker: Walker, node: fx.Node, x: Value | None) -> object:
    return walker.reduce(node, _channels(x), _arg(node, 1, "dim"))


@register_graph_handler("softmax", heads=True)
def _softmax_method(walker: Walker, node: fx.Node, x: Value | None) -> object:
    return walker.softmax(node, _channels(x), _arg(node, 1, "dim"))


@register_graph_handler("unbind", heads=True)
def _unbind_method(walker: Walker, node: fx.Node, x: Value | None) -> object:
    return walker.unbind(node, _channels(x), _arg(node, 1, "dim", 0))


@register_graph_handler("unsqueeze")
def _unsqueeze_method(walker: Walker, node: fx.Node, x: Value | None) -> object:
    return walker.unsqueeze(node, _channels(x), _arg(node, 1, "dim"))


@register_graph_handler("expand", heads=True)
def _expand_method(walker: Walker, node: fx.Node, x: Value | None) -> object:
    return walker.expand(node, _channels(x))


@register_graph_handler("split", torch.split)
def _split(walker: Walker, node: fx.Node, x: Value | None) -> object:
    return walker.split(node, _channels(x), _arg(node, 1, "split_size"), _arg(node, 2, "dim", 0))


@register_graph_handler(operator.pow, torch.pow, "pow", heads=True)
def _power(walker: Walker, node: fx.Node, x: Value | None) -> object:
    """``x ** 3.0`` (GELU written out) keeps the layout; a tensor exponent is an unknown op."""
    exponent = _arg(node, 1, "exponent")
    return x if isinstance(exponent, (int, float)) else walker.unknown(node, "pow with a tensor exponent")


class _Tracer(fx.Tracer):
    def __init__(self, leaves: tuple[str, ...]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if (
            qualname in self.leaves
            or type(m).__name__ in self.leaves
            or isinstance(m, PrunedMultiheadAttention)
            or type(m) in MODULE_HANDLERS
        ):  # a registered module type is handled whole, not traced into
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module, example_input: Any, leaves: tuple[str, ...] = ()) -> fx.GraphModule:
    """Trace ``model`` and annotate every node with its shape on ``example_input``.

    ``torch.fx`` symbolic tracing first (a tensor or a tuple of positional tensors); when it cannot trace the model
    (control flow on tensor values, item assignment on proxies: Hugging Face transformers) or the input is a dict
    of keyword arguments, ``torch._dynamo`` captures the torch-level graph instead (``slimkit.pruning.capture``)."""
    run_late_registrations()
    is_leaf = _Tracer(tuple(leaves)).is_leaf_module
    if isinstance(example_input, dict):
        return _dynamo(model, example_input, is_leaf, None)
    try:
        graph = _Tracer(tuple(leaves)).trace(model)
    except Exception as exc:
        return _dynamo(model, example_input, is_leaf, exc)
    gm = fx.GraphModule(model, graph)
    inputs = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    prop = _ShapeProp(gm)
    try:
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints the traceback itself
            prop.propagate(*inputs)
    except Exception as exc:
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in inputs]
        raise UsageError(
            f"{type(model).__name__} fails on the example input of shape "
            f"{shapes[0] if len(shapes) == 1 else shapes}{_where(model, prop.current)}: "
            f"{_first_line(exc.__cause__ or exc)}. Pass an input of the shape the model expects"
        ) from exc
    return gm


def _dynamo(model: nn.Module, example_input: Any, is_leaf, fx_error: Exception | None) -> fx.GraphModule:
    """The dynamo capture, or the error naming both failures."""
    from slimkit.pruning.capture import dynamo_trace

    try:
        return dynamo_trace(model, example_input, is_leaf)
    except Exception as exc:
        from slimkit._inputs import call

        try:
            with torch.no_grad():
                call(model, example_input)
        except Exception as run_error:  # a model that fails on its input: say that, not "cannot trace"
            shapes = {k: tuple(v.shape) for k, v in tensors_of(example_input)}
            raise UsageError(
                f"{type(model).__name__} fails on the example input {shapes}: {_first_line(run_error)}. Pass an "
                "input the model accepts"
            ) from run_error
        why = f"with torch.fx ({type(fx_error).__name__}: {_first_line(fx_error)}) nor " if fx_error else ""
        raise UsageError(
            f"cannot trace {type(model).__name__} {why}with torch._dynamo ({type(exc).__name__}: "
            f"{_first_line(exc)}). Make the control flow independent of tensor values, or name the offending "
            "submodule in PruneConfig.leaf_modules so it is kept intact"
        ) from exc


class _ShapeProp(ShapeProp):
    """``ShapeProp`` that remembers the node it is running (to name the layer that fails)."""

    current: fx.Node | None = None

    def run_node(self, n: fx.Node):
        self.current = n
        return super().run_node(n)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _where(model: nn.Module, node: fx.Node | None) -> str:
    """`` at layer 'features.0' (Conv2d)`` / `` at op add (add_1) in 'layer1.0'``: where a traced run failed."""
    if node is None or node.op in ("placeholder", "output"):
        return ""
    if node.op == "call_module":
        return f" at layer {node.target!r} ({type(model.get_submodule(str(node.target))).__name__})"
    stack = node.meta.get("nn_module_stack") or {}
    owner = list(stack.values())[-1][0] if stack else ""
    op = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f" at op {op} ({node.name})" + (f" in {owner!r}" if owner else "")


def build_graph(model: nn.Module, example_input: torch.Tensor, leaves: tuple[str, ...] = ()) -> PruneGraph:
    """Trace ``model`` and return its prunable channel groups (in graph order) and what is kept intact."""
    gm = trace(model, example_input, leaves)
    walker = Walker(model, gm)
    walker.run()
    sp = walker.sp
    out_copies = _fuse_copies(walker)
    out_repeat = _fuse_repeats(walker)
    _tie_shared(walker, out_copies, _Tracer(tuple(leaves)).is_leaf_module)
    for root in {sp.find(s) for s in walker.order}:
        if sp.size[root] % sp.unit[root]:
            sp.freeze(root, f"units of {sp.unit[root]} channels (groups, heads) do not tile {sp.size[root]} channels")
    groups: list[Group] = []
    group_of_space: dict[int, Group] = {}
    kept: list[dict[str, Any]] = []
    roots = sorted(
        {sp.find(s) for s in walker.order}, key=lambda r: min(walker.order[s] for s in walker.order if sp.find(s) == r)
    )
    for root in roots:
        members = sp.members[root]
        producers = [m for m in members if m.role in ("out", "heads")]
        gid = f"{producers[0].module}:{producers[0].role}"
        params = [(name, dim) for name, (space, dim) in walker.params.items() if sp.find(space) == root]
        if root in sp.frozen:
            kept.append(
                {
                    "group": gid,
                    "modules": list(dict.fromkeys(m.module for m in members)),
                    "reasons": sp.frozen[root],
                    **({"params": [p for p, _ in params]} if params else {}),
                }
            )
            continue
        attrs = sorted({a for space, found in walker.head_attrs.items() if sp.find(space) == root for a in found})
        group = Group(
            gid,
            sp.size[root],
            sp.unit[root],
            members,
            {m.module: scoring_view(walker.modules[m.module]) for m in members},
            attrs,
            params,
        )
        groups.append(group)
        group_of_space[root] = group
    for root, reasons in sp.frozen.items():
        used = [name for name, (space, _) in walker.params.items() if sp.find(space) == root]
        if root not in roots and (
            used or any(not r.startswith(("model input", "model output", "embedding dim")) for r in reasons)
        ):
            kept.append({"group": None, "modules": [], "reasons": reasons, **({"params": used} if used else {})})
    return PruneGraph(
        groups,
        kept,
        walker.out_space,
        walker.in_segs,
        walker.heads_space,
        group_of_space,
        sp.find,
        out_copies,
        walker.head_ops,
        walker.head_splits,
        walker.params,
        out_repeat,
    )


def _tensor_dims(walker: Walker, owner: str, attr: str, fused: dict[str, int]) -> dict[int, tuple[Seg, ...]] | None:
    """Which channel segments lie along each dim of layer ``owner``'s tensor ``attr`` as the walk used it;
    ``None`` when unknown (a layer without channel surgery, one the walk never reached, attention, a fused
    projection)."""
    sp = walker.sp
    module = walker.modules.get(owner)
    out, ins = walker.out_space.get(owner), walker.in_segs.get(owner)
    if module is None or owner in walker.heads_space or owner in fused or (out is None and ins is None):
        return None
    outs = None if out is None else (Seg(out, sp.size[sp.find(out)]),)
    dense = isinstance(module, nn.Linear) or (isinstance(module, CONVS + TRANSPOSED) and module.groups == 1)
    if dense and outs is not None and ins is not None:
        if attr == "weight":
            return {0: ins, 1: outs} if isinstance(module, TRANSPOSED) else {0: outs, 1: ins}
        return {0: outs} if attr == "bias" else None
    if out is None and ins is not None and attr in ("weight", "bias", "running_mean", "running_var"):  # norms...
        return {0: ins}
    return None


def _tie_shared(walker: Walker, fused: dict[str, int], is_leaf) -> None:
    """A tensor used in several places (``b.weight = a.weight``, tied weights, a layer's weight also read in
    forward) is cut once, so every use must cut it the same way: the channel spaces along each of its dims are
    unified; where one use is unknown, all of them are kept intact."""
    uses: dict[int, list[tuple[str, dict | None]]] = {}
    for owner, module in walker.model.named_modules():
        if not is_leaf(module, owner):  # its tensors are read in forward: the get_attr uses below
            continue
        for attr, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None:
                uses.setdefault(id(tensor), []).append(
                    (f"{owner}.{attr}" if owner else attr, _tensor_dims(walker, owner, attr, fused))
                )
    for target, found in walker.attr_uses.items():
        try:
            tensor = walker.model.get_parameter(target)
        except AttributeError:
            try:
                tensor = walker.model.get_buffer(target)
            except AttributeError:
                continue
        uses.setdefault(id(tensor), []).append((f"{target} (read in forward)", found))
    for used in (u for u in uses.values() if len(u) > 1):
        where = f"tensor shared by {', '.join(dict.fromkeys(name for name, _ in used))}"
        dims = [found for _, found in used]
        if any(found is None for found in dims):
            for name, found in used:
                for segs in (found or {}).values():
                    walker.freeze(Value(0, segs), f"{where} (kept intact)")
                owner = name.rpartition(".")[0]
                spaces = [
                    walker.out_space.get(owner),
                    walker.heads_space.get(owner),
                    *(s.space for s in walker.in_segs.get(owner, ())),
                ]
                for space in (s for s in spaces if s is not None):
                    walker.sp.freeze(space, f"{where} (kept intact)")
            continue
        known = [found for found in dims if found is not None]
        for dim in sorted({d for found in known for d in found}):
            along = [found.get(dim) for found in known]
            present = [segs for segs in along if segs is not None]
            if len(present) != len(along):
                walker.freeze([Value(0, segs) for segs in present], f"{where} (dim {dim})")
                continue
            for segs in present[1:]:
                walker.unify(Value(0, present[0]), Value(0, segs), where)
            for seg in present[0]:
                if walker.sp.find(seg.space) in walker.sp.frozen:  # say why the sharers are kept with the rest
                    walker.sp.freeze(seg.space, f"{where} (tied to channels kept intact)")


def _fuse_copies(walker: Walker) -> dict[str, int]:
    """A fused q/k/v projection (output split into parts x heads x head_dim) becomes a producer of the heads
    space with ``copies = parts``, when nothing else reads its output; otherwise both spaces are kept intact."""
    sp, out = walker.sp, {}
    for space, (target, parts) in walker.copies.items():
        root = sp.find(space)
        members = sp.members[root]
        if root != space or root in sp.frozen or len(members) != 1 or members[0].role != "out":
            reason = f"fused projection {members[0].module if members else '?'} read other than by its head split"
            sp.freeze(root, reason)
            sp.freeze(target, reason)
            continue
        name = members.pop().module
        sp.members[sp.find(target)].append(Member(name, "out", copies=parts))
        walker.out_space[name] = target
        walker.order[target] = walker.order.pop(space)
        out[name] = parts
    return out


def _fuse_repeats(walker: Walker) -> dict[str, tuple[int, int]]:
    """Grouped-query attention: a key/value projection whose heads ``repeat_kv`` repeats joins the group of the
    repeated heads (role ``repeat``), which is cut in units of ``repeat`` query heads, so each kept unit keeps its
    key/value head. When anything else reads the key/value channels, both are kept intact."""
    sp, out = walker.sp, {}
    for space, repeated, repeat, head_dim in walker.repeats:
        root = sp.find(space)
        members = sp.members[root]
        ok = root not in sp.frozen and members and all(m.role == "out" and m.copies == 1 for m in members)
        if not ok or sp.find(repeated) in sp.frozen:
            reason = f"key/value heads of {members[0].module if members else '?'} read other than by repeat_kv"
            sp.freeze(root, reason)
            sp.freeze(repeated, reason)
            continue
        for member in list(members):
            members.remove(member)
            sp.members[sp.find(repeated)].append(Member(member.module, "repeat", repeat=repeat))
            walker.out_space[member.module] = repeated
            out[member.module] = (repeat, head_dim)
        for sid in [s for s in walker.order if sp.find(s) == root]:
            walker.order.pop(sid)
        target = sp.find(repeated)
        if not any(sp.find(s) == target for s in walker.order):
            walker.order[repeated] = len(walker.order) + len(walker.repeats)
    return out
