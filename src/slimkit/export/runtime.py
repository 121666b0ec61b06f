"""ONNX Runtime sessions that behave like a torch model: tensor in, tensor out, fixed thread count.

Example:
    >>> ort_model = OrtModel("model.onnx", threads=2)                    # doctest: +SKIP
    >>> parity(result.model, ort_model, test_data)["top1_agreement"]     # doctest: +SKIP
    0.999
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from slimkit.errors import DependencyError, MissingFileError, UsageError

__all__ = ["OrtModel", "parity"]


class OrtModel:
    """An ONNX Runtime CPU session callable on a torch tensor (returns a torch tensor).

    ``threads`` fixes intra-op threads (inter-op is 1) so latency compares fairly with ``torch.set_num_threads``.
    ``spin`` keeps ORT's default: worker threads busy-wait briefly after each run, which is what a deployment gets
    (and is worth ~1.7x on LeNet-5 at batch 64). Those spinning threads would steal the cores from whatever runs
    right after; ``slimkit.measure.benchmark_latency`` therefore idles between candidates' blocks and does not time
    their first call. Pass ``spin=False`` when something else must run on the same cores meanwhile.
    """

    def __init__(self, path: str | os.PathLike, threads: int = 2, optimize: bool = True, spin: bool = True) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise DependencyError("OrtModel needs onnxruntime: pip install 'slimkit[onnx]'") from exc
        self.path = Path(path)
        if not self.path.is_file():
            raise MissingFileError(f"ONNX model {self.path} does not exist")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        if not optimize:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.threads = threads

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().cpu().contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])

    def __repr__(self) -> str:
        return f"OrtModel({str(self.path)!r}, threads={self.threads})"


@torch.no_grad()
def parity(torch_model: nn.Module, ort_model, data, batch_size: int = 256) -> dict[str, float]:
    """Compare a torch model and a runtime on ``data`` (Dataset, DataLoader or tensor): largest absolute output
    difference, and the fraction (0-1) of inputs whose top-1 class agrees."""
    from torch.utils.data import DataLoader

    torch_model.eval()
    if isinstance(data, torch.Tensor):
        batches = data.split(batch_size)
    else:
        loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size)
        batches = [b[0] if isinstance(b, (list, tuple)) else b for b in loader]
    max_diff, agree, count = 0.0, 0, 0
    for x in batches:
        a, b = torch_model(x), torch.as_tensor(ort_model(x))
        if a.shape != b.shape:
            raise UsageError(f"parity: output shapes differ: torch {tuple(a.shape)} vs runtime {tuple(b.shape)}")
        max_diff = max(max_diff, float((a - b).abs().max()))
        agree += int((a.argmax(1) == b.argmax(1)).sum())
        count += len(x)
    if count == 0:
        raise UsageError("parity: no data")
    return {"max_abs_diff": max_diff, "top1_agreement": agree / count, "count": count}
