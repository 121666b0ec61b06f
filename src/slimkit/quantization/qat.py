"""Quantization-aware training: fake-quant forward with STE, LSQ step sizes, observers frozen after calibration,
BatchNorm statistics frozen from ``freeze_bn_epoch`` on, quantizer ranges (LSQ step sizes, min-max weight scales)
frozen from ``freeze_observer_epoch`` on, then BN folding and conversion to the eval model."""

from __future__ import annotations

from torch import nn

from slimkit.quantization.config import QuantConfig
from slimkit.quantization.fake import ActQuantizer, QuantConv2d, QuantLinear, WeightQuantizer
from slimkit.train import FitResult, LossFn, Optimizer, TrainConfig, fit

__all__ = ["train_qat"]


def _freeze_bn_hook(state: dict[str, bool]):
    def hook(module: nn.Module, args) -> None:
        if state["frozen"]:
            module.train(False)

    return hook


def freeze_quantizers(model: nn.Module) -> None:
    """Stop every quantizer range from changing: LSQ step sizes stop learning, min-max weight scales stop being
    re-derived from the moving weights (the weights themselves keep training against the frozen grid)."""
    for module in model.modules():
        if isinstance(module, ActQuantizer | WeightQuantizer):
            module.frozen = True
            if isinstance(module.scale, nn.Parameter):
                module.scale.requires_grad_(False)


def train_qat(model: nn.Module, data, val_data, cfg: QuantConfig, loss_fn: LossFn | None) -> FitResult:
    """Train the prepared (fake-quant, BN not folded) ``model`` in place."""
    settings = cfg.qat
    state = {"frozen": settings.freeze_bn_epoch == 0}
    handles = [
        m.register_forward_pre_hook(_freeze_bn_hook(state))
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d)
    ]

    if settings.freeze_observer_epoch == 0:
        freeze_quantizers(model)

    def on_epoch_end(epoch: int, _model: nn.Module, _history: FitResult) -> None:
        if epoch + 1 >= settings.freeze_bn_epoch:
            state["frozen"] = True
        if settings.freeze_observer_epoch is not None and epoch + 1 >= settings.freeze_observer_epoch:
            freeze_quantizers(model)

    train_cfg = TrainConfig(
        epochs=settings.epochs,
        lr=settings.lr,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        max_batches=settings.max_batches,
        optimizer=Optimizer.ADAM,
        restore_best=val_data is not None,
    )
    try:
        history = fit(model, data, val_data, train_cfg, loss_fn=loss_fn, on_epoch_end=on_epoch_end)
    finally:
        for h in handles:
            h.remove()
    for layer in model.modules():  # the last step moved the weights: re-derive the frozen scales
        if isinstance(layer, QuantLinear | QuantConv2d):
            wq = layer.weight_quant
            if not wq.learnable and not wq.frozen:
                wq.refresh(layer.weight)
    return history
