"""ONNX graph pieces both integer back ends share: the fp32 export they rewrite, and re-sorting the nodes.

``export_float`` takes the example input as ``slimkit._inputs`` does (tensor, tuple or dict), names the ONNX inputs
after the forward's arguments and the outputs after the model's (``"output"`` or the dict / ``ModelOutput`` keys),
and makes dim 0 dynamic (and dim 1 of integer, token, inputs). It exports with TorchScript at ``OPSET``; a model
TorchScript cannot export (an op it lacks, e.g. ``aten::diff`` in GPT-2 / Llama masks) is exported with
``torch.onnx.export(..., dynamo=True)`` when ``onnxscript`` is installed. The exporter used is written in the
model's metadata (``slimkit.exporter``).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from slimkit._inputs import as_args, call, input_names, named_outputs, tensors_of
from slimkit.errors import DependencyError, UsageError
from slimkit.export.registry import INTEGER_TABLE, IntegerLayer, handled
from slimkit.models.hf import eager_attention

__all__ = [
    "DYNAMO_OPSET",
    "OPSET",
    "default_dynamic_axes",
    "export_float",
    "integer_tables",
    "quantize_tables",
    "toposort",
]

OPSET = 17
DYNAMO_OPSET = 18  # the lowest opset torch's dynamo exporter writes

DynamicShapes = Mapping[str, Mapping[int, str] | None]


class _Flat(nn.Module):
    """``model`` as a function of its input tensors only (in the order of ``tensors_of``), returning a flat tuple
    of its output tensors (in the order of ``named_outputs``): what both exporters trace."""

    def __init__(self, model: nn.Module, example_input: Any) -> None:
        super().__init__()
        self.model = model
        args, kwargs = as_args(example_input)
        self.args, self.kwargs = list(args), dict(kwargs)
        self.slots = [slot for slot, _ in tensors_of(example_input)]

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args, kwargs = list(self.args), dict(self.kwargs)
        for slot, tensor in zip(self.slots, tensors):
            if isinstance(slot, str):
                kwargs[slot] = tensor
            else:
                args[slot] = tensor
        return tuple(t for _, t in named_outputs(self.model(*args, **kwargs)))


def default_dynamic_axes(names: list[str], tensors: list[torch.Tensor]) -> dict[str, dict[int, str]]:
    """Dim 0 of every input is ``batch``; dim 1 of an integer (token) input is ``sequence``."""
    axes: dict[str, dict[int, str]] = {}
    for name, tensor in zip(names, tensors):
        dims: dict[int, str] = {0: "batch"} if tensor.dim() >= 1 else {}
        if tensor.dim() >= 2 and not tensor.is_floating_point() and not tensor.is_complex():
            dims[1] = "sequence"
        axes[name] = dims
    return axes


def _dynamic_axes(
    names: list[str], tensors: list[torch.Tensor], dynamic_shapes: DynamicShapes | None
) -> dict[str, dict[int, str]]:
    axes = default_dynamic_axes(names, tensors)
    for name, dims in (dynamic_shapes or {}).items():
        if name not in axes:
            raise UsageError(f"export_onnx: dynamic_shapes names input {name!r}; the inputs are {', '.join(names)}")
        rank = tensors[names.index(name)].dim()
        checked = {int(d): str(n) for d, n in (dims or {}).items()}
        if any(not 0 <= d < rank for d in checked):
            raise UsageError(f"export_onnx: dynamic_shapes[{name!r}] names dims {sorted(checked)}; it has {rank}")
        axes[name] = checked
    return axes


def _torchscript(flat: nn.Module, tensors: tuple, names: list[str], outputs: list[str], axes: dict) -> bytes:
    buffer = io.BytesIO()
    output_axes = {name: {0: "batch"} for name in outputs}
    # torch types the target as a path only; a file object works (and is documented)
    torch.onnx.export(
        flat,
        tensors,
        buffer,  # type: ignore[arg-type]
        dynamo=False,
        opset_version=OPSET,
        input_names=names,
        output_names=outputs,
        dynamic_axes={**output_axes, **axes},
    )
    return buffer.getvalue()


def _dynamo(flat: nn.Module, tensors: tuple, names: list[str], outputs: list[str], axes: dict) -> bytes:
    from torch.export import Dim

    shapes = tuple({dim: Dim.DYNAMIC for dim in axes[name]} for name in names)
    program = torch.onnx.export(
        flat,
        tensors,
        dynamo=True,
        opset_version=DYNAMO_OPSET,
        input_names=names,
        output_names=outputs,
        dynamic_shapes=(shapes,),
        verbose=False,
    )
    if program is None:  # only when a file was given
        raise UsageError("export_onnx: torch.onnx.export(dynamo=True) returned no program")
    proto = program.model_proto
    for value in proto.graph.input:  # the symbols torch.export chose ('s67') get the names the caller gave
        dims = axes.get(value.name, {})
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            if i in dims and dim.dim_param:
                dim.dim_param = dims[i]
    return proto.SerializeToString()


def export_float(model: nn.Module, example_input: Any, dynamic_shapes: DynamicShapes | None = None) -> Any:
    """``model`` as an fp32 ONNX ``ModelProto``: TorchScript at ``OPSET``, or the dynamo exporter when TorchScript
    cannot export it (``metadata_props['slimkit.exporter']`` says which).

    Args:
        example_input: a tensor (ONNX input ``input``), a tuple (inputs named after the forward's arguments) or a
            dict (its keys).
        dynamic_shapes: ``{input name: {dim: symbol}}`` replacing the default dynamic dims of the inputs named
            (``{}`` makes an input static).
    """
    import onnx

    tensors = [t for _, t in tensors_of(example_input)]
    if not tensors:
        raise UsageError("export_onnx: example_input holds no tensor")
    names = input_names(model, example_input)
    if len(set(names)) != len(names):
        raise UsageError(f"export_onnx: input names repeat ({names}); pass example_input as a dict")
    axes = _dynamic_axes(names, tensors, dynamic_shapes)
    # a dynamic dim of size 1 is traced as the constant 1 (torch.export's 0/1 specialisation, and TorchScript's
    # broadcasts): trace at 2 instead, the example's own entries repeated
    tensors = [_grown(t, {d: s for d, s in axes.get(n, {}).items() if t.shape[d] == 1}) for n, t in zip(names, tensors)]
    flat = _Flat(model, example_input).eval()
    with torch.no_grad():
        outputs = [name for name, _ in named_outputs(call(model, example_input))]
    if not outputs:
        raise UsageError("export_onnx: the model's output holds no tensor")
    with warnings.catch_warnings(), eager_attention(model):  # transformers' SDPA exports as a slower graph
        warnings.simplefilter("ignore")
        try:
            data, exporter = _torchscript(flat, tuple(tensors), names, outputs, axes), "torchscript"
            problem = _dynamic_problem(data, flat, tensors, names, axes)
            if problem:  # the trace baked a dynamic size into a constant (e.g. nn.MultiheadAttention's reshapes)
                raise UsageError(f"the TorchScript graph fails at other sizes of the dynamic dims: {problem}")
        except Exception as exc:  # any failure of the TorchScript exporter (unsupported op, tracing error)
            try:
                import onnxscript  # noqa: F401  # the dynamo exporter needs it
            except ImportError:
                raise DependencyError(
                    f"export_onnx: TorchScript cannot export the model ({_first_line(exc)}); the dynamo exporter "
                    "needs onnxscript: pip install 'slimkit[onnx]'"
                ) from exc
            try:
                data, exporter = _dynamo(flat, tuple(tensors), names, outputs, axes), "dynamo"
                problem = _dynamic_problem(data, flat, tensors, names, axes)
                if problem:
                    raise UsageError(f"the graph fails at other sizes of the dynamic dims: {problem}")
            except Exception as dynamo_exc:
                raise UsageError(
                    f"export_onnx: neither exporter can export the model: TorchScript: {_first_line(exc)}; "
                    f"dynamo: {_first_line(dynamo_exc)}"
                ) from dynamo_exc
    proto = onnx.load_from_string(data)
    _strip_wrapper_prefix(proto.graph)
    onnx.helper.set_model_props(proto, {"slimkit.exporter": exporter})
    return proto


def _strip_wrapper_prefix(graph: Any) -> None:
    """Initializers named after the model's own parameters (``fc.weight``, not ``model.fc.weight``): the back ends
    find a layer's weight by its name."""
    prefix = "model."
    renamed = {i.name: i.name[len(prefix) :] for i in graph.initializer if i.name.startswith(prefix)}
    taken = (
        {i.name for i in graph.initializer} | {v.name for v in graph.input} | {o for n in graph.node for o in n.output}
    )
    renamed = {old: new for old, new in renamed.items() if new not in taken}
    for init in graph.initializer:
        init.name = renamed.get(init.name, init.name)
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)


def _grown(tensor: torch.Tensor, dims: dict[int, str]) -> torch.Tensor:
    """``tensor`` a few entries longer along each dynamic dim (its own leading entries repeated: token ids and masks
    stay valid)."""
    for dim in dims:
        size = tensor.shape[dim]
        extra = tensor.narrow(dim, 0, max(1, min(size, 3)))
        tensor = torch.cat([tensor, extra], dim=dim)
    return tensor


def _dynamic_problem(
    data: bytes, flat: nn.Module, tensors: list[torch.Tensor], names: list[str], axes: dict[str, dict[int, str]]
) -> str | None:
    """Run the exported graph on inputs grown along their dynamic dims and compare with the model: None when it
    agrees (or onnxruntime is not installed, or no dim is dynamic), else what went wrong."""
    if not any(axes.values()):
        return None
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    grown = [_grown(t, axes.get(n, {})) for n, t in zip(names, tensors)]
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 4  # the failure is reported here, not on stderr
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        got = session.run(None, {n: t.detach().cpu().numpy() for n, t in zip(names, grown)})
    except Exception as exc:  # onnxruntime raises its own exception types
        return _first_line(exc)
    with torch.no_grad():
        expected = flat(*grown)
    for i, (a, b) in enumerate(zip(got, expected)):
        b = b.detach().cpu()
        if tuple(a.shape) != tuple(b.shape):
            return f"output {i} has shape {tuple(a.shape)}, the model gives {tuple(b.shape)}"
        if b.is_floating_point():
            spread = float(b.abs().max()) if b.numel() else 0.0
            if b.numel() and float((torch.from_numpy(a) - b).abs().max()) > 1e-3 * max(spread, 1.0):
                return f"output {i} differs from the model's"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def toposort(graph: Any) -> None:
    """Order ``graph``'s nodes so each runs after the producers of its inputs (ONNX requires it)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise UsageError("export_onnx: the quantized graph has a cycle or a dangling input")
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        pending = [n for n in pending if n not in ready]
    del graph.node[:]
    graph.node.extend(ordered)


def integer_tables(model: nn.Module) -> list[tuple[str, IntegerLayer]]:
    """``(name, IntegerLayer)`` for every quantized lookup table (embedding) of ``model``, in module order."""
    return [(name, handler(module)) for name, module, handler in handled(INTEGER_TABLE, model)]


def quantize_tables(proto: Any, model: nn.Module) -> list[str]:
    """Rewrite each ``Gather`` on a quantized embedding's fp32 table to read its int8 codes (in place); returns the
    names of the tables rewritten (a table the graph does not gather from, e.g. never used, is left out).

    ``Gather(codes, ids) -> Cast -> Mul(Unsqueeze(Gather(row scales, ids)))``: only the gathered rows are
    dequantized (``DequantizeLinear(codes, row scales, axis=0) -> Gather`` takes the same bytes on disk, but ONNX
    Runtime dequantizes the whole table on every run: 1.63 ms vs 0.098 ms for MiniLM's 30522x384 table at 1x128).
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    by_bytes: dict[tuple, str] = {}
    for name, init in inits.items():
        if init.data_type == TensorProto.FLOAT and len(init.dims) == 2:
            array = numpy_helper.to_array(init)
            by_bytes[(array.shape, array.tobytes())] = name
    identity = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}
    done = []
    for name, table in integer_tables(model):
        if table.codes is None or not table.symmetric or table.bits > 8:
            raise UsageError(
                f"export_onnx: embedding {name!r} needs symmetric per-row codes of <= 8 bits for an int8 Gather "
                f"(has {table.bits}-bit {table.scheme} {table.granularity})"
            )
        weight = np.ascontiguousarray(table.dequantized.numpy().astype(np.float32))
        source = by_bytes.get((weight.shape, weight.tobytes()))
        gathers = [
            n
            for n in graph.node
            if n.op_type == "Gather" and source is not None and identity.get(n.input[0], n.input[0]) == source
        ]
        if not gathers or any(helper.get_attribute_value(a) != 0 for n in gathers for a in n.attribute):
            continue
        tag = f"{name}.table"
        codes = table.codes.numpy().astype(np.int8)
        scale = np.broadcast_to(table.scale.numpy().astype(np.float32), (codes.shape[0],))
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.ascontiguousarray(codes), f"{tag}.int8"),
                numpy_helper.from_array(np.ascontiguousarray(scale), f"{tag}.scale"),
            ]
        )
        graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), f"{tag}.last_axis"))
        for i, node in enumerate(gathers):
            ids, out, t = node.input[1], node.output[0], f"{tag}.{i}"
            graph.node.remove(node)
            graph.node.extend(
                [
                    helper.make_node("Gather", [f"{tag}.int8", ids], [f"{t}.q"], name=f"{t}.Gather", axis=0),
                    helper.make_node("Gather", [f"{tag}.scale", ids], [f"{t}.s"], name=f"{t}.GatherScale", axis=0),
                    helper.make_node("Cast", [f"{t}.q"], [f"{t}.f"], name=f"{t}.Cast", to=TensorProto.FLOAT),
                    helper.make_node("Unsqueeze", [f"{t}.s", f"{tag}.last_axis"], [f"{t}.s1"], name=f"{t}.Unsq"),
                    helper.make_node("Mul", [f"{t}.f", f"{t}.s1"], [out], name=f"{t}.Dequantize"),
                ]
            )
        done.append(name)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:  # the fp32 tables the codes replaced
        graph.initializer.remove(init)
    toposort(graph)
    return done
