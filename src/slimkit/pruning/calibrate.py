"""Data-aware pruning: activation statistics for the ``activation`` criterion, and least-squares reconstruction.

Both read a few calibration batches (``PruneConfig.calibration_batches`` of ``train_data``; labels are ignored, so
unlabelled text or images do).

- ``input_energy``: the mean square of every input feature of the layers that read a pruned group (Linear: the last
  dimension; Conv: dim 1). ``activation`` scores a unit by the output energy it feeds its consumers,
  ``sum E[x_c^2] * ||W[:, c]||^2`` over its input columns (FLAP / Wanda-style, structured).
- ``reconstruct_``: after the cut, every Linear / Conv2d that lost input channels (``reconstruct="all"``: every one
  from the first cut on) is refitted, one after another in the order the forward calls them, so that on the
  calibration inputs it reproduces what the original layer produced from the original inputs: ridge least squares
  on ``[x_pruned, 1] -> y_original`` (Kwon et al. 2022's layer-wise reconstruction). Each refit sees the inputs the
  layers before it (already refitted) produce. Padded tokens (``attention_mask == 0``) are left out of both.

Example:
    >>> import slimkit, torch
    >>> from torch.utils.data import TensorDataset
    >>> model = slimkit.models.create("mlp")
    >>> data = TensorDataset(torch.randn(256, 1, 28, 28), torch.zeros(256, dtype=torch.long))
    >>> cfg = slimkit.PruneConfig(amount=0.5, target="channels", importance="activation", reconstruct=True)
    >>> result = slimkit.prune(model, cfg, torch.zeros(1, 1, 28, 28), train_data=data)
    >>> result.model[3].in_features, result.record["reconstructed"]
    (100, ['3'])
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from slimkit._inputs import attention_mask, call, split_batch
from slimkit.errors import UsageError

__all__ = ["CACHE_BYTES", "RIDGE", "calibration_inputs", "input_energy", "reconstruct_"]

RIDGE = 1e-3  # ridge strength, relative to the mean diagonal of X^T X


class _Stop(Exception):
    """Raised by a hook once the layer of interest has run: the rest of the forward is not needed."""


def calibration_inputs(train_data: Any, batches: int, why: str) -> list[Any]:
    """The inputs (labels dropped) of the first ``batches`` batches of ``train_data``."""
    from slimkit.train import make_loader

    if train_data is None:
        raise UsageError(
            f"{why} needs calibration inputs: pass train_data= to prune (its first {batches} batches are used; "
            "labels are not needed)"
        )
    out = []
    for i, batch in enumerate(make_loader(train_data, 64, shuffle=False)):
        if i >= batches:
            break
        out.append(split_batch(batch)[0])
    return out


def _rows(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The layer's input as ``(samples, features)`` rows: one per token / position (conv: per output position,
    the unfolded receptive field); rows of padded tokens dropped."""
    if isinstance(module, nn.Conv2d):
        padding = cast(tuple[int, ...], module.padding)  # never a str: see _refittable
        cols = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if mask is not None and x.ndim == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


def _out_rows(module: nn.Module, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        return y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
    return _rows(module, y, mask)


@torch.no_grad()
def input_energy(model: nn.Module, names: list[str], inputs: list[Any]) -> dict[str, torch.Tensor]:
    """``{name: mean square of each input feature}`` of the named layers over the calibration ``inputs`` (Linear:
    features on the last dim, padded tokens left out; convolutions: channels on dim 1)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    modules = dict(model.named_modules())
    mask: list[torch.Tensor | None] = [None]

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            if isinstance(module, nn.Linear):
                rows = _rows(module, x, mask[0])
            else:
                rows = x.transpose(0, 1).reshape(x.shape[1], -1).t()
            sums[name] = sums.get(name, 0) + rows.pow(2).sum(0)
            counts[name] = counts.get(name, 0) + rows.shape[0]

        return record

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        for batch in inputs:
            mask[0] = attention_mask(batch)
            call(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return {n: sums[n] / max(counts[n], 1) for n in sums}


def _capture(model: nn.Module, names: list[str], batch: Any, output: bool) -> dict[str, torch.Tensor]:
    """The input (or output) of each named layer on ``batch`` (its first call); the forward stops as soon as all of
    them have run."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(_module, args, result=None):
            seen.setdefault(name, (result if output else args[0]).detach().float())
            if len(seen) == len(names):
                raise _Stop

        return record

    modules = [model.get_submodule(n) for n in names]
    handles = [m.register_forward_hook(hook(n)) if output else m.register_forward_pre_hook(hook(n))
               for n, m in zip(names, modules)]  # fmt: skip
    try:
        call(model, batch)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n in names if n not in seen]
    if missing:
        raise UsageError(f"prune: reconstruct: layer {missing[0]!r} did not run on the calibration inputs")
    return seen


def _groups(model: nn.Module, names: list[str], batch: Any) -> list[list[str]]:
    """The named layers in the order the forward first calls them, in runs that read the very same input tensor
    (a transformer's query, key and value): refitting one cannot change the others' inputs, so a run is refitted
    from one pass."""
    calls: list[tuple[str, torch.Tensor]] = []

    def hook(name: str):
        return lambda _m, args: None if any(n == name for n, _ in calls) else calls.append((name, args[0]))

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            call(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    for i, (name, x) in enumerate(calls):
        if i and x is calls[i - 1][1]:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


@torch.no_grad()
def reconstruct_(
    original: nn.Module, pruned: nn.Module, plan: dict[str, dict], inputs: list[Any], scope: str = "pruned"
) -> list[str]:
    """Refit, in place and in forward order, the weights (and bias) of layers of ``pruned`` so that each
    reproduces ``original``'s output of that layer (its kept output channels) on the calibration ``inputs``;
    returns the names refitted. ``scope="pruned"``: the layers whose input channels the prune ``plan`` cut;
    ``"all"``: every Linear / Conv2d from the first of those on, so layers downstream of the cut also correct
    the drift of their inputs (more calibration data wanted: each layer's fit has ``features + 1`` unknowns per
    output). Only Linear and ungrouped Conv2d layers are refitted.

    The original's layer outputs are read in one pass per batch for as many layers as ``CACHE_BYTES`` holds, and
    layers that read the same input tensor are refitted from one pass of ``pruned``."""
    from slimkit.pruning.surgery import decode_indices

    keep_out: dict[str, torch.Tensor | None] = {}
    for name, module in pruned.named_modules():
        edit = plan.get(name, {})
        if _refittable(module) and (scope == "all" or edit.get("in") is not None) and "dim" not in edit:
            keep_out[name] = None if edit.get("out") is None else decode_indices(edit["out"])
    cut = [n for n in keep_out if plan.get(n, {}).get("in") is not None]
    if not cut or not inputs:
        return []
    groups = _groups(pruned, list(keep_out), inputs[0])
    first = next((i for i, group in enumerate(groups) if set(group) & set(cut)), len(groups))
    groups = groups[first:]  # layers before the first cut see no change
    training = original.training
    original.eval()  # the reference outputs (and the caller's BatchNorm statistics stay as they are)
    try:
        done: list[str] = []
        chunks, batch0 = _chunks(original, groups, keep_out, inputs)
        for chunk in chunks:
            names = [n for group in chunk for n in group]
            targets: dict[str, list[torch.Tensor]] = {n: [batch0[n]] for n in names}  # read when sizing
            for batch in inputs[1:]:
                outputs = _capture(original, names, batch, output=True)
                for n in names:
                    targets[n].append(_targets(original.get_submodule(n), outputs[n], batch, keep_out[n]))
            for group in chunk:
                done += _refit(pruned, group, targets, inputs)
        return done
    finally:
        original.train(training)


CACHE_BYTES = 2 << 30  # the most memory the original's cached layer outputs take at once


def _targets(module: nn.Module, y: torch.Tensor, batch: Any, keep: torch.Tensor | None) -> torch.Tensor:
    rows = _out_rows(module, y, attention_mask(batch))
    return rows if keep is None else rows[:, keep]


def _chunks(
    original: nn.Module, groups: list[list[str]], keep_out: dict[str, torch.Tensor | None], inputs: list[Any]
) -> tuple[list[list[list[str]]], dict[str, torch.Tensor]]:
    """The groups, in order, cut into chunks whose cached outputs (sized on the first batch) fit ``CACHE_BYTES``,
    and every layer's targets on that first batch."""
    names = [n for group in groups for n in group]
    outputs = _capture(original, names, inputs[0], output=True)
    first = {n: _targets(original.get_submodule(n), outputs[n], inputs[0], keep_out[n]) for n in names}
    sizes = {n: first[n].numel() * 4 * len(inputs) for n in names}
    chunks: list[list[list[str]]] = []
    used = CACHE_BYTES
    for group in groups:
        size = sum(sizes[n] for n in group)
        if used + size > CACHE_BYTES:
            chunks.append([])
            used = 0
        chunks[-1].append(group)
        used += size
    return chunks, first


def _refittable(module: nn.Module) -> bool:
    """A Linear, or a zero-padded ungrouped Conv2d with numeric padding (what ``F.unfold`` reproduces)."""
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return isinstance(module, nn.Linear)


def _refit(pruned: nn.Module, group: list[str], targets: dict[str, list[torch.Tensor]], inputs: list[Any]) -> list[str]:
    """Least-squares refit of the layers of ``group`` of ``pruned`` to their ``targets`` (see ``reconstruct_``)."""
    modules = {n: cast(nn.Linear | nn.Conv2d, pruned.get_submodule(n)) for n in group}  # see _refittable
    gram: dict[str, torch.Tensor] = {}
    cross: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(inputs):
        mask = attention_mask(batch)
        seen = _capture(pruned, group, batch, output=False)
        for name, module in modules.items():
            x = _rows(module, seen[name], mask).double()
            if module.bias is not None:
                x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
            y = targets[name][i].double()
            gram[name] = gram[name] + x.T @ x if name in gram else x.T @ x
            cross[name] = cross[name] + x.T @ y if name in cross else x.T @ y
    for name, module in modules.items():
        g = gram[name]
        g += RIDGE * g.diagonal().mean().clamp_min(1e-12) * torch.eye(len(g), dtype=g.dtype)
        solution = torch.linalg.solve(g, cross[name]).T.float()  # (out, features [+ 1])
        weight = solution[:, :-1] if module.bias is not None else solution
        module.weight.copy_(weight.reshape(module.weight.shape))
        if module.bias is not None:
            module.bias.copy_(solution[:, -1])
    return group
