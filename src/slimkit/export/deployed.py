"""The forms a model ships in, and which of them is fastest on this machine.

A speed-up that exists only in PyTorch eager is not a speed-up: pruning and quantization are judged on the runtime
the model is deployed on. ``deployed_forms`` builds every form a model can ship in:

- a float model: ONNX Runtime fp32, and PyTorch eager with BatchNorm folded into the convolutions in channels-last
  memory format (oneDNN's fastest fp32 eager form);
- a slimkit int8 model (static activation quantization): ONNX Runtime QDQ int8, and PyTorch's x86 oneDNN int8
  kernels (``torch_int8.py``; needs calibration batches and torchao). oneDNN tends to win from batch 64 up,
  ONNX Runtime at batch 1-8;
- a dynamic int8 model: ONNX Runtime ``MatMulInteger``.

``fastest_form`` times them side by side (``slimkit.measure.benchmark_latency``, interleaved, threads fixed) and
returns the fastest with every measurement, so a report can say what was compared.

Example:
    >>> best = fastest_form(model, torch.zeros(1, 3, 32, 32), batch_size=64)        # doctest: +SKIP
    >>> best.name, round(best.ms, 2)                                                 # doctest: +SKIP
    ('onnxruntime fp32', 36.3)
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from slimkit.export.lowering import is_dynamic_model, is_int8_model

__all__ = ["Deployed", "DeployedSpeed", "deployed_forms", "eager_fp32", "fastest_form", "fastest_forms", "is_quantized"]

Form = Callable[[torch.Tensor], object]


def is_quantized(model: nn.Module) -> bool:
    """``model`` is a slimkit int8 model (static or dynamic activation quantization)."""
    return is_int8_model(model) or is_dynamic_model(model)


def eager_fp32(model: nn.Module) -> Form:
    """``model`` in eval mode with BatchNorm folded into the preceding convolutions (``torch.fx`` fusion) and
    channels-last 4-D tensors; a model ``torch.fx`` cannot trace keeps its BatchNorms (folding is an
    optimisation, never a requirement)."""
    from torch.fx.experimental.optimization import fuse

    work = copy.deepcopy(model).eval()
    try:
        work = fuse(work)
    except Exception:  # untraceable forward: time it unfused, as users would run it  # nosec B110
        pass
    channels_last = any(isinstance(m, nn.Conv2d) for m in work.modules())
    if channels_last:
        work = work.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def run(x: torch.Tensor) -> object:
        return work(x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x)

    return run


def deployed_forms(
    model: nn.Module,
    example_input: torch.Tensor,
    folder: str | Path,
    *,
    calib: torch.Tensor | list[torch.Tensor] | None = None,
    threads: int = 2,
    batch_size: int = 64,
    only: tuple[str, ...] | None = None,
) -> dict[str, Form]:
    """Every form ``model`` can ship in on this machine, by name (ONNX files are written into ``folder``).

    ``calib``: input batches for PyTorch's oneDNN int8 form of a static int8 model (without them, or without
    torchao, only ONNX Runtime int8 is built); that form is lowered for ``batch_size`` first (other batch sizes
    lower on first use). ``only``: build just these names (all of the model's forms when none of them applies).
    """
    from slimkit.export.onnx import export_onnx
    from slimkit.export.runtime import OrtModel

    folder = Path(folder)
    quantized = is_quantized(model)
    names = ("onnxruntime int8", "onednn int8") if quantized else ("onnxruntime fp32", "eager fp32")
    wanted = [n for n in names if only is None or n in only] or list(names)
    forms: dict[str, Form] = {}

    def onnxruntime() -> None:
        path = export_onnx(model, example_input, folder / f"model-{names[0].split()[1]}.onnx", int8=quantized)
        forms[names[0]] = OrtModel(path, threads=threads)

    if names[0] in wanted:
        onnxruntime()
    if "eager fp32" in wanted:
        forms["eager fp32"] = eager_fp32(model)
    if "onednn int8" in wanted and is_int8_model(model) and calib is not None:
        try:
            from slimkit.export.torch_int8 import to_torch_int8

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                one = example_input[:1]
                shape = (max(batch_size, 2), *one.shape[1:])  # batch 1 would be specialised by torch.export
                forms["onednn int8"] = to_torch_int8(model, calib, one.expand(shape).contiguous())
        except ImportError:  # torchao missing: ONNX Runtime is the only int8 runtime
            pass
        except Exception as exc:  # a graph oneDNN's lowering refuses: the model still ships on ONNX Runtime
            warnings.warn(f"oneDNN int8 form not built ({type(exc).__name__}: {str(exc)[:120]})", stacklevel=2)
    if not forms:  # only oneDNN was asked and it could not be built: the model still ships on ONNX Runtime
        onnxruntime()
    return forms


@dataclass
class Deployed:
    """The fastest form: ``name``, median ``ms`` at ``batch_size``, and every form's median ms (``all``)."""

    name: str
    ms: float
    batch_size: int
    all: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        """``"onnxruntime fp32 36.3 ms (eager fp32 41.0 ms)"``: the choice and what it beat."""
        others = ", ".join(f"{n} {ms:.3g} ms" for n, ms in self.all.items() if n != self.name)
        return f"{self.name} {self.ms:.3g} ms" + (f" ({others})" if others else "")


@dataclass
class DeployedSpeed:
    """One model's fastest deployed form at one batch size: its name, median ms, quartiles, and every form's ms."""

    runtime: str
    ms: float
    p25_ms: float
    p75_ms: float
    all_ms: dict[str, float] = field(default_factory=dict)


def fastest_forms(
    models: Mapping[str, nn.Module],
    example_input: torch.Tensor,
    batch_size: int,
    *,
    calib: torch.Tensor | list[torch.Tensor] | None = None,
    threads: int = 2,
    max_seconds: float = 8.0,
    only: tuple[str, ...] | None = None,
) -> dict[str, DeployedSpeed]:
    """Every deployed form of every model (``deployed_forms``), all timed side by side in one interleaved run at
    ``batch_size`` (``slimkit.measure.benchmark_latency``); each model's fastest form, by label.

    Example:
        >>> speed = fastest_forms({"before": model, "after": pruned}, x, 64)             # doctest: +SKIP
        >>> speed["after"].runtime, round(speed["after"].ms, 1)                          # doctest: +SKIP
        ('onnxruntime fp32', 7.9)
    """
    from slimkit.measure import benchmark_latency

    one = example_input[:1]
    with tempfile.TemporaryDirectory(prefix="slimkit-deploy-") as tmp:
        forms: dict[str, Form] = {}
        for i, (label, model) in enumerate(models.items()):
            folder = Path(tmp) / str(i)
            folder.mkdir()
            built = deployed_forms(model, one, folder, calib=calib, threads=threads, batch_size=batch_size, only=only)
            forms.update({f"{label}: {name}": form for name, form in built.items()})
        timed = benchmark_latency(forms, one, (batch_size,), threads=threads, max_seconds=max_seconds)
    speeds: dict[str, DeployedSpeed] = {}
    for label in models:
        mine = {key.split(": ", 1)[1]: t[batch_size] for key, t in timed.items() if key.startswith(f"{label}: ")}
        best = min(mine, key=lambda name: mine[name].median)
        stats = mine[best]
        speeds[label] = DeployedSpeed(
            best, stats.median * 1e3, stats.p25 * 1e3, stats.p75 * 1e3, {n: t.median * 1e3 for n, t in mine.items()}
        )
    return speeds


def fastest_form(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    batch_size: int = 64,
    threads: int = 2,
    calib: torch.Tensor | list[torch.Tensor] | None = None,
    forms: tuple[str, ...] | None = None,
    max_seconds: float = 8.0,
) -> Deployed:
    """Time every deployed form of ``model`` at ``batch_size`` side by side and return the fastest.

    ``forms``: restrict to these names (e.g. ``("onnxruntime fp32",)``).
    """
    speed = fastest_forms(
        {"model": model}, example_input, batch_size, calib=calib, threads=threads, max_seconds=max_seconds, only=forms
    )["model"]
    return Deployed(speed.runtime, speed.ms, batch_size, speed.all_ms)
