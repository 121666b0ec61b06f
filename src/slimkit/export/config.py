"""``ExportConfig``: the deployable format a recipe's ``export`` step writes (a config of the export back ends)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from slimkit.config import Config, check_range
from slimkit.errors import UsageError

__all__ = ["ExportConfig", "ExportFormat"]


class ExportFormat(str, enum.Enum):
    ONNX = "onnx"
    ONNX_INT8 = "onnx-int8"
    ONNX_AUTO = "onnx-auto"  # int8 and fp32 ONNX measured side by side; the faster one inside the budget ships
    TORCH_EXPORT = "torch-export"


@dataclass
class ExportConfig(Config):
    """The deployable format written next to the weights; ``parity`` checks it against PyTorch on the val data.

    ``onnx-auto`` exports fp32, QDQ int8 and (for nets with convolutions and fully connected layers) int8 for the
    fully connected layers only, times them on ONNX Runtime at ``auto_batch_size`` (threads fixed) and, among the
    variants that keep the budget and run within ``size_slack`` (10%) of the fastest, ships the smallest file:
    int8 kernels lose to fp32 on thin convolutions, where quantize/dequantize and layout reorders outweigh the
    cheaper arithmetic.
    """

    format: ExportFormat = ExportFormat.ONNX_INT8
    parity: bool = True
    auto_batch_size: int = 64
    size_slack: float = 0.10

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("size_slack", self.size_slack, 0.0, 10.0)
        if self.auto_batch_size < 1:
            raise UsageError(f"auto_batch_size={self.auto_batch_size} must be >= 1")
