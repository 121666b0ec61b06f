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

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from slimkit.pruning.attention import PrunedMultiheadAttention

__all__ = ["Group", "Member", "PruneGraph", "Seg", "build_graph"]

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU,
    nn.Mish, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity, nn.MaxPool1d, nn.MaxPool2d,
    nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Upsample, nn.ZeroPad2d,
)
PASS_FUNCTIONS = {
    F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.leaky_relu, F.elu, F.mish,
    F.dropout, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool2d, F.max_pool2d,
    F.avg_pool1d, F.max_pool1d, F.interpolate, torch.relu, torch.sigmoid, torch.tanh, torch.clone,
    torch.nn.functional.pad,
}
PASS_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "float", "to", "type_as", "detach",
                "sigmoid_", "clamp", "clamp_", "hardtanh_", "exp", "abs", "neg"}
BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
          torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum}
BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
SHAPE_QUERIES = {"size", "dim", "numel"}


@dataclass(frozen=True)
class Seg:
    """``channels`` channels of ``space``, each spread over ``block`` consecutive positions of the channel dim."""

    space: int
    channels: int
    block: int = 1


@dataclass
class Value:
    chdim: int | None
    segs: tuple[Seg, ...]

    @property
    def width(self) -> int:
        return sum(s.channels * s.block for s in self.segs)


@dataclass
class Member:
    """One module touched by a group. ``role``: ``out`` (produces the channels), ``in`` (reads them at
    ``offset`` with ``block`` features per channel), ``through`` (norm/depthwise/PReLU indexed by channel) or
    ``heads`` (the inner q/k/v width of attention)."""

    module: str
    role: str
    offset: int = 0
    block: int = 1


@dataclass
class Group:
    """Coupled channels: pruning channel ``i`` removes it from every member. ``unit`` channels form one
    prunable element (a GroupNorm group or an attention head)."""

    id: str
    size: int
    unit: int
    members: list[Member]
    modules: dict[str, nn.Module] = field(repr=False, default_factory=dict)

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
    out_space: dict[str, int]          # module -> space of its output channels (producers)
    in_segs: dict[str, tuple[Seg, ...]]  # module -> segments of the channels it reads (consumers, through)
    heads_space: dict[str, int]
    group_of_space: dict[int, Group]
    root: callable = field(repr=False, default=None)


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


class _Walker:
    def __init__(self, model: nn.Module, gm: fx.GraphModule) -> None:
        self.model, self.gm = model, gm
        self.modules = dict(model.named_modules())
        self.sp = _Spaces()
        self.env: dict[fx.Node, object] = {}
        self.out_space: dict[str, int] = {}
        self.in_segs: dict[str, tuple[Seg, ...]] = {}
        self.heads_space: dict[str, int] = {}
        self.order: dict[int, int] = {}

    # -- values -------------------------------------------------------------------------------------------------
    @staticmethod
    def shape(node) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def fresh(self, node: fx.Node, reason: str | None) -> Value | None:
        shape = self.shape(node)
        if shape is None:
            return None
        if len(shape) < 2:
            return Value(None, ())
        return Value(1, (Seg(self.sp.new(shape[1], reason), shape[1]),))

    def made(self, node: fx.Node) -> Value | None:
        return self.fresh(node, f"tensor made in forward ({node.name})")

    def freeze(self, value, reason: str) -> None:
        if isinstance(value, Value):
            for seg in value.segs:
                self.sp.freeze(seg.space, reason)
        elif isinstance(value, (list, tuple)):
            for v in value:
                self.freeze(v, reason)

    def values_in(self, node: fx.Node) -> list:
        found = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(self.env.get(n)))
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
        if role == "heads":
            self.heads_space[name] = sid
        else:
            self.out_space[name] = sid
        return Value(chdim, (Seg(sid, size),))

    def read(self, name: str, value: Value, role: str) -> None:
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
                self.env[node] = self.fresh(node, f"parameter/buffer used directly ({node.target})")
            elif node.op == "output":
                for value in self.values_in(node):
                    self.freeze(value, "model output")
            elif node.op == "call_module":
                self.env[node] = self.call_module(node)
            elif node.op == "call_function":
                self.env[node] = self.call_function(node, node.target, getattr(node.target, "__name__", "fn"))
            else:  # call_method
                self.env[node] = self.call_method(node)

    def arg_value(self, node: fx.Node, index: int = 0) -> Value | None:
        arg = node.args[index] if len(node.args) > index else None
        value = self.env.get(arg) if isinstance(arg, fx.Node) else None
        return value if isinstance(value, Value) else None

    def call_module(self, node: fx.Node):
        name, module = node.target, self.modules[node.target]
        x = self.arg_value(node)
        kind = type(module).__name__
        if x is None or x.chdim is None:
            return self.unknown(node, f"input to {kind} {name!r}")
        shape = self.shape(node.args[0])
        if isinstance(module, PASS_MODULES):
            return x
        if isinstance(module, nn.Softmax | nn.LogSoftmax):
            dim = (module.dim if module.dim is not None else -1) % len(shape)
            return self.unknown(node, f"softmax over channels in {name!r}") if dim == x.chdim else x
        if isinstance(module, nn.Flatten):
            return self.flatten(node, x, shape, module.start_dim, module.end_dim)
        if isinstance(module, BATCH_NORMS) or (isinstance(module, INSTANCE_NORMS) and module.affine):
            self.read(name, x, "through")
            return x
        if isinstance(module, INSTANCE_NORMS):
            return x
        if isinstance(module, nn.PReLU):
            if module.num_parameters > 1:
                self.read(name, x, "through")
            return x
        if isinstance(module, nn.GroupNorm):
            if x.chdim != 1 or len(x.segs) != 1:
                return self.unknown(node, f"GroupNorm {name!r} on a concatenated/flattened input")
            self.read(name, x, "through")
            root = self.sp.find(x.segs[0].space)
            self.sp.unit[root] = math.lcm(self.sp.unit[root], module.num_channels // module.num_groups)
            return x
        if isinstance(module, nn.LayerNorm):
            if x.chdim != len(shape) - 1 or len(module.normalized_shape) != 1:
                return self.unknown(node, f"LayerNorm {name!r} over several dims")
            self.read(name, x, "through")
            return x
        if isinstance(module, nn.Linear):
            x = self.at_dim(node, x, len(shape) - 1, shape)
            if x is None:
                return self.unknown(node, f"Linear {name!r} applied to a non-channel dim")
            self.read(name, x, "in")
            return self.new_producer(name, module.out_features, len(shape) - 1)
        if isinstance(module, CONVS + TRANSPOSED):
            x = self.at_dim(node, x, 1, shape)
            return self.unknown(node, f"{kind} {name!r} input") if x is None else self.conv(node, name, module, x)
        if isinstance(module, nn.MultiheadAttention | PrunedMultiheadAttention):
            return self.attention(node, name, module)
        return self.unknown(node, f"module {kind} {name!r} (kept intact)")

    def at_dim(self, node, x: Value, dim: int, shape) -> Value | None:
        """``x`` with channels on ``dim``; a fully frozen value (e.g. the model input) is re-read there."""
        if x.chdim == dim:
            return x
        if all(self.sp.find(s.space) in self.sp.frozen for s in x.segs):
            return Value(dim, (Seg(self.sp.new(shape[dim], "model input"), shape[dim]),))
        return None

    def conv(self, node, name: str, module: nn.Module, x: Value):
        kind = type(module).__name__
        if module.groups == 1:
            self.read(name, x, "in")
            return self.new_producer(name, module.out_channels, 1)
        if module.groups == module.in_channels == module.out_channels and not isinstance(module, TRANSPOSED):
            self.read(name, x, "through")  # depthwise: input and output channels are the same channels
            return x
        return self.unknown(node, f"grouped {kind} {name!r} (groups={module.groups}, kept intact)")

    def attention(self, node, name: str, module: nn.Module):
        reason = f"embedding dim of MultiheadAttention {name!r} (residual stream kept)"
        for value in self.values_in(node):
            self.freeze(value, reason)
        shape = self.shape(node.args[0])
        embed = Value(len(shape) - 1, (Seg(self.sp.new(module.embed_dim, reason), module.embed_dim),))
        weights = Value(None, ())
        if (getattr(module, "_qkv_same_embed_dim", True) and getattr(module, "bias_k", None) is None
                and not getattr(module, "add_zero_attn", False) and module.num_heads > 1):
            inner = module.num_heads * module.head_dim
            self.new_producer(name, inner, len(shape) - 1, role="heads", unit=module.head_dim)
        return (embed, weights)

    def flatten(self, node, x: Value, shape, start: int, end: int):
        ndim = len(shape)
        start, end = start % ndim, end % ndim
        if x.chdim < start:
            return x
        if x.chdim > end:
            return Value(x.chdim - (end - start), x.segs)
        if x.chdim != start:
            return self.unknown(node, "flatten that interleaves channels")
        inner = math.prod(shape[start + 1:end + 1])
        return Value(start, tuple(Seg(s.space, s.channels, s.block * inner) for s in x.segs))

    def reshape(self, node, x: Value, sizes):
        src, dst = self.shape(node.args[0]), self.shape(node)
        c = x.chdim
        literal = sizes[c] if len(sizes) > c else None
        if dst[:c + 1] == src[:c + 1]:
            if isinstance(literal, int) and literal != -1:
                return self.unknown(node, f"reshape with a literal channel count {literal}")
            return x
        # merge of dims [c, e] into one (a flatten written as view/reshape)
        for end in range(c + 1, len(src)):
            if dst == (*src[:c], math.prod(src[c:end + 1]), *src[end + 1:]):
                if isinstance(literal, int) and literal != -1:
                    return self.unknown(node, f"reshape with a literal feature count {literal}")
                return self.flatten(node, x, src, c, end)
        return self.unknown(node, f"reshape {src} -> {dst} that splits channels")

    def binary(self, node: fx.Node, where: str):
        out_shape = self.shape(node)
        if out_shape is None:
            return None
        tensors = [(a, self.env.get(a)) for a in node.args[:2] if isinstance(a, fx.Node)]
        tensors = [(a, v) for a, v in tensors if isinstance(v, Value)]
        if not tensors:
            return self.made(node)
        base = next((v for a, v in tensors if len(self.shape(a)) == len(out_shape) and v.chdim is not None), None)
        if base is None:
            return self.unknown(node, where)
        for arg, value in tensors:
            if value is base:
                continue
            shape = self.shape(arg)
            aligned = base.chdim - (len(out_shape) - len(shape))
            if aligned < 0 or shape[aligned] == 1:
                continue
            if value.chdim != aligned:
                self.freeze(value, f"{where} ({node.name}) broadcasts across channels")
                self.freeze(base, f"{where} ({node.name}) broadcasts across channels")
            else:
                self.unify(base, value, f"{where} ({node.name})")
        return base

    def call_function(self, node: fx.Node, fn, fname: str):
        if fn is operator.getitem:
            return self.getitem(node)
        if fn in BINARY:
            return self.binary(node, fname)
        if fn is torch.cat or fn is torch.concat:
            return self.cat(node)
        x = self.arg_value(node)
        if x is None:
            return self.made(node) if not self.values_in(node) else self.unknown(node, f"function {fname}")
        if fn in PASS_FUNCTIONS:
            return x
        shape = self.shape(node.args[0])
        if fn is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self.flatten(node, x, shape, start, end)
        if fn is torch.reshape:
            return self.reshape(node, x, node.args[1])
        if fn in (torch.permute, torch.transpose):
            return self.permute(node, x, fn.__name__, node.args[1:])
        if fn in (torch.mean, torch.sum, torch.amax):
            return self.reduce(node, x, node.args[1] if len(node.args) > 1 else node.kwargs.get("dim"))
        if fn in (F.softmax, torch.softmax, F.log_softmax):
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            return self.unknown(node, "softmax over channels") if dim % len(shape) == x.chdim else x
        return self.unknown(node, f"function {fname}")

    def call_method(self, node: fx.Node):
        method = node.target
        x = self.arg_value(node)
        if method in SHAPE_QUERIES:
            return None
        if x is None:
            return self.made(node) if not self.values_in(node) else self.unknown(node, f"method .{method}()")
        if method in BINARY_METHODS:
            return self.binary(node, method)
        if method in PASS_METHODS:
            return x
        shape = self.shape(node.args[0])
        rest = node.args[1:]
        if method == "flatten":
            start = rest[0] if rest else node.kwargs.get("start_dim", 0)
            end = rest[1] if len(rest) > 1 else node.kwargs.get("end_dim", -1)
            return self.flatten(node, x, shape, start, end)
        if method in ("view", "reshape"):
            sizes = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
            return self.reshape(node, x, list(sizes))
        if method in ("permute", "transpose"):
            return self.permute(node, x, method, rest)
        if method in ("mean", "sum", "amax"):
            return self.reduce(node, x, rest[0] if rest else node.kwargs.get("dim"))
        if method == "softmax":
            dim = rest[0] if rest else node.kwargs.get("dim")
            return self.unknown(node, "softmax over channels") if dim % len(shape) == x.chdim else x
        return self.unknown(node, f"method .{method}()")

    def getitem(self, node: fx.Node):
        source = self.env.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        index = node.args[1]
        if isinstance(source, tuple):
            return source[index]
        if not isinstance(source, Value):
            return self.made(node) if self.shape(node) is not None else None
        if source.chdim is None:
            return self.made(node)
        index = index if isinstance(index, tuple) else (index,)
        if any(i is Ellipsis or i is None or isinstance(i, fx.Node) for i in index):
            return self.unknown(node, "indexing")
        if len(index) > source.chdim and index[source.chdim] != slice(None):
            return self.unknown(node, "indexing into channels")
        dropped = sum(isinstance(i, int) for i in index[:source.chdim])
        return Value(source.chdim - dropped, source.segs)

    def cat(self, node: fx.Node):
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        values = [self.env.get(t) for t in tensors]
        if not all(isinstance(v, Value) and v.chdim is not None for v in values):
            return self.unknown(node, "torch.cat of untracked tensors")
        out_ndim = len(self.shape(node))
        dim %= out_ndim
        if any(v.chdim != values[0].chdim for v in values):
            return self.unknown(node, "torch.cat of tensors with different channel dims")
        if dim == values[0].chdim:
            return Value(dim, tuple(s for v in values for s in v.segs))
        for other in values[1:]:
            self.unify(values[0], other, f"torch.cat ({node.name})")
        return values[0]

    def permute(self, node: fx.Node, x: Value, how: str, args):
        ndim = len(self.shape(node))
        if how == "transpose":
            a, b = (int(args[0]) % ndim, int(args[1]) % ndim)
            new = b if x.chdim == a else a if x.chdim == b else x.chdim
            return Value(new, x.segs)
        dims = list(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else list(args)
        dims = [d % ndim for d in dims]
        return Value(dims.index(x.chdim), x.segs)

    def reduce(self, node: fx.Node, x: Value, dim):
        if dim is None:
            return self.unknown(node, "reduction over all dims")
        ndim = len(self.shape(node.args[0]))
        dims = [d % ndim for d in (dim if isinstance(dim, (tuple, list)) else [dim])]
        if x.chdim in dims:
            return self.unknown(node, "reduction over channels")
        keep = len(self.shape(node)) == ndim
        return Value(x.chdim if keep else x.chdim - sum(d < x.chdim for d in dims), x.segs)


class _Tracer(fx.Tracer):
    def __init__(self, leaves: tuple[str, ...]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaves or type(m).__name__ in self.leaves or isinstance(m, PrunedMultiheadAttention):
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module, example_input: torch.Tensor, leaves: tuple[str, ...] = ()) -> fx.GraphModule:
    """Symbolically trace ``model`` and annotate every node with its shape on ``example_input``."""
    try:
        graph = _Tracer(tuple(leaves)).trace(model)
    except Exception as exc:
        raise ValueError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}). Make the control "
            "flow independent of tensor values, or name the offending submodule in PruneConfig.leaf_modules "
            "so it is kept intact") from exc
    gm = fx.GraphModule(model, graph)
    inputs = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    except Exception as exc:
        shapes = [tuple(t.shape) for t in inputs]
        raise ValueError(f"the model fails on the example input of shape {shapes}: {exc}. Pass an input of "
                         "the shape the model expects") from exc
    return gm


def build_graph(model: nn.Module, example_input: torch.Tensor, leaves: tuple[str, ...] = ()) -> PruneGraph:
    """Trace ``model`` and return its prunable channel groups (in graph order) and what is kept intact."""
    gm = trace(model, example_input, leaves)
    walker = _Walker(model, gm)
    walker.run()
    sp = walker.sp
    groups, group_of_space, kept = [], {}, []
    roots = sorted({sp.find(s) for s in walker.order}, key=lambda r: min(
        walker.order[s] for s in walker.order if sp.find(s) == r))
    for root in roots:
        members = sp.members[root]
        producers = [m for m in members if m.role in ("out", "heads")]
        gid = f"{producers[0].module}:{producers[0].role}"
        if root in sp.frozen:
            kept.append({"group": gid, "modules": list(dict.fromkeys(m.module for m in members)),
                         "reasons": sp.frozen[root]})
            continue
        group = Group(gid, sp.size[root], sp.unit[root], members,
                      {m.module: walker.modules[m.module] for m in members})
        groups.append(group)
        group_of_space[root] = group
    for root, reasons in sp.frozen.items():
        if root not in roots and any(not r.startswith(("model input", "model output", "embedding dim"))
                                     for r in reasons):
            kept.append({"group": None, "modules": [], "reasons": reasons})
    return PruneGraph(groups, kept, walker.out_space, walker.in_segs, walker.heads_space, group_of_space, sp.find)
