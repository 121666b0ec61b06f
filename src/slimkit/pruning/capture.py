"""A torch-level graph of models ``torch.fx`` cannot trace symbolically, captured with ``torch._dynamo``.

Hugging Face transformers (BERT, GPT-2, Llama, ViT) build masks and caches with Python control flow on tensor
values, which symbolic tracing refuses. Dynamo runs the forward on the example input and records the torch-level
ops it takes, specialising that control flow away (shapes are static: the graph is only read, never run; the
pruned model runs its own Python forward). Dynamo inlines every module, so this module turns the recorded graph
back into the form the walker reads from ``torch.fx``:

- ``get_attr`` targets become the parameters' qualified names (``encoder.layer.0.attention.self.query.weight``);
- the ops of one call of a leaf module (``nn.Linear``, ``nn.LayerNorm``, a registered type, a name in
  ``leaf_modules``) become one ``call_module`` node, so the module handlers and surgery apply as with fx;
- ``nn_module_stack`` holds ``(qualified name, type)`` as fx writes it, and every node gets ``tensor_meta`` from
  dynamo's recorded example values (what ``ShapeProp`` gives a fx trace).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from slimkit._inputs import as_args, named_outputs

__all__ = ["dynamo_trace"]


@dataclass(frozen=True)
class _Meta:
    """The part of ``ShapeProp``'s ``TensorMetadata`` the walker reads."""

    shape: torch.Size
    dtype: torch.dtype


class _TensorOutputs(nn.Module):
    """``model`` whose output is the flat tuple of its output tensors (a ``ModelOutput`` may hold a cache object
    dynamo cannot return)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        return tuple(t for _, t in named_outputs(self.model(*args, **kwargs)))


def _meta_of(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return _Meta(torch.Size(int(s) for s in value.shape), value.dtype)
    if isinstance(value, (tuple, list)):
        return tuple(_meta_of(v) for v in value)
    return None


def dynamo_trace(model: nn.Module, example_input: Any, is_leaf: Callable[[nn.Module, str], bool]) -> fx.GraphModule:
    """The torch-level graph of ``model`` on ``example_input`` (tensor, tuple or dict), with leaf modules
    (``is_leaf(module, qualified name)``) as ``call_module`` nodes; raises what dynamo raises when it cannot
    capture one graph."""
    args, kwargs = as_args(example_input)
    import torch._dynamo

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch._dynamo.reset()
        exported = torch._dynamo.export(_TensorOutputs(model), aten_graph=False, assume_static_by_default=True)(
            *args, **kwargs
        )
    gm = exported.graph_module
    names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    tensors: dict[int, str] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        tensors.setdefault(id(t), name)
    return _rebuild(model, gm, names, tensors, is_leaf)


def _stack(node: fx.Node, names: dict[int, str]) -> list[tuple[str, type]]:
    """The node's module stack, outermost first, as ``(qualified name, type)`` of ``model``'s modules."""
    found = []
    for key, (_, cls) in (node.meta.get("nn_module_stack") or {}).items():
        try:
            name = names.get(int(str(key).split("@")[0]))
        except ValueError:
            name = None
        if name is not None:
            found.append((name, cls))
    return found


def _rebuild(
    model: nn.Module,
    gm: fx.GraphModule,
    names: dict[int, str],
    tensors: dict[int, str],
    is_leaf: Callable[[nn.Module, str], bool],
) -> fx.GraphModule:
    modules = dict(model.named_modules())
    nodes = list(gm.graph.nodes)
    stacks = {n: _stack(n, names) for n in nodes}

    def leaf_of(node: fx.Node) -> str | None:
        for name, _ in stacks[node]:
            if name and name in modules and is_leaf(modules[name], name):
                return name
        return None

    # runs of consecutive nodes inside one leaf module call
    runs: list[tuple[str | None, list[fx.Node]]] = []
    for node in nodes:
        owner = leaf_of(node) if node.op not in ("placeholder", "output") else None
        if runs and owner is not None and runs[-1][0] == owner:
            runs[-1][1].append(node)
        else:
            runs.append((owner, [node]))
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    root: dict[str, Any] = {}

    def copy(node: fx.Node) -> fx.Node:
        if node.op == "get_attr":
            value = getattr(gm, str(node.target))
            target = tensors.get(id(value)) or names.get(id(value)) or str(node.target)
            if target not in root:
                root[target] = value
            new = graph.create_node("get_attr", target, name=node.name)
        else:
            new = graph.node_copy(node, lambda n: env[n])
        new.meta = dict(node.meta)
        _fix_meta(new, node, stacks[node])
        return new

    for owner, run in runs:
        call = _as_call(owner, run, tensors, gm) if owner is not None else None
        if owner is None or call is None:
            for node in run:
                env[node] = copy(node)
            continue
        x, out = call
        new = graph.create_node("call_module", owner, (env[x],), name=out.name)
        root[owner] = modules[owner]
        new.meta = dict(out.meta)
        _fix_meta(new, out, stacks[out][:-1] or stacks[out])
        env[out] = new
    graph.lint()
    return fx.GraphModule(root, graph)


def _fix_meta(new: fx.Node, old: fx.Node, stack: list[tuple[str, type]]) -> None:
    new.meta["tensor_meta"] = _meta_of(old.meta.get("example_value"))
    new.meta["nn_module_stack"] = {name: (name, cls) for name, cls in stack if name}


def _as_call(
    owner: str, run: list[fx.Node], tensors: dict[int, str], gm: fx.GraphModule
) -> tuple[fx.Node, fx.Node] | None:
    """``(input, output)`` when ``run`` (the ops of one call of ``owner``) reads one tensor from outside besides
    its own parameters and gives one tensor to later nodes; ``None`` otherwise (then it stays inlined)."""
    inside = set(run)
    inputs: list[fx.Node] = []
    for node in run:
        for arg in node.all_input_nodes:
            if arg in inside or arg in inputs:
                continue
            if arg.op == "get_attr" and tensors.get(id(getattr(gm, str(arg.target))), "").startswith(owner + "."):
                continue
            if isinstance(arg.meta.get("example_value"), torch.Tensor):
                inputs.append(arg)
    outputs = [n for n in run if any(u not in inside for u in n.users)]
    if len(inputs) != 1 or len(outputs) != 1 or not isinstance(outputs[0].meta.get("example_value"), torch.Tensor):
        return None
    return inputs[0], outputs[0]
