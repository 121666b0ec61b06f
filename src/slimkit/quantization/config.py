"""``QuantConfig`` and the per-layer plan it resolves to (bits, scheme, activation bits per layer)."""

from __future__ import annotations

import dataclasses
import enum
import typing
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from slimkit._modules import matches
from slimkit.config import Config, FlatField, check_range, check_type, nested_config
from slimkit.errors import UsageError
from slimkit.quantization.math import Granularity, ObserverKind

__all__ = [
    "LayerSpec",
    "Method",
    "PTQSettings",
    "QATSettings",
    "QuantConfig",
    "Scheme",
    "WeightOnlyAlgorithm",
    "WeightOnlySettings",
    "plan_layers",
    "quantizable",
    "unsupported",
]


class Method(str, enum.Enum):
    DYNAMIC = "dynamic"
    PTQ = "ptq"
    QAT = "qat"


class Scheme(str, enum.Enum):
    SYMMETRIC = "symmetric"
    AFFINE = "affine"
    TERNARY = "ternary"
    BINARY = "binary"


class WeightOnlyAlgorithm(str, enum.Enum):
    """Weight-only block quantization of Linear layers (``weight_only.py``), exported as ``MatMulNBits``."""

    RTN = "rtn"
    GPTQ = "gptq"
    AWQ = "awq"


#: weight bits the weight-only algorithms produce (ONNX Runtime's MatMulNBits runs 4 and 8)
WEIGHT_ONLY_BITS = (4, 8)
#: the group size weight-only algorithms use when ``group_size`` is 0
WEIGHT_ONLY_GROUP = 128


OVERRIDE_KEYS = {"weight_bits", "act_bits", "scheme", "granularity", "group_size"}


class _Unset(enum.Enum):
    """The default of a flat keyword: "not given" (``None`` is a value of ``max_batches`` and
    ``freeze_observer_epoch``)."""

    UNSET = 0


UNSET = _Unset.UNSET


@dataclass
class PTQSettings(Config):
    """What only ``method="ptq"`` reads, after calibration.

    Args:
        bias_correction: remove the mean output shift caused by weight rounding.
        adaround: learn each uniform weight's rounding (up or down) layer by layer to reconstruct the float layer's
            output on the calibration data (AdaRound; ``adaround.py``); needs ``method="ptq"``.
        adaround_iters, adaround_lr: AdaRound's optimizer steps per layer and its Adam learning rate.
    """

    bias_correction: bool = True
    adaround: bool = False
    adaround_iters: int = 300
    adaround_lr: float = 1e-2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("adaround_lr", self.adaround_lr, 0.0, 10.0, low_open=True)
        if self.adaround_iters < 1:
            raise UsageError(f"adaround_iters={self.adaround_iters} must be >= 1")


@dataclass
class QATSettings(Config):
    """What only ``method="qat"`` reads: the training run (Adam; the best epoch on ``val_data`` is kept).

    Args:
        epochs, lr, max_batches: QAT training (``max_batches``: batches per epoch, None for all).
        lsq: learn the quantizers' step sizes (LSQ) instead of re-deriving them from min-max.
        freeze_bn_epoch: BN statistics freeze from this epoch on (0: frozen throughout).
        freeze_observer_epoch: quantizer ranges (LSQ steps, min-max weight scales) freeze from this epoch on
            (None: never).
    """

    epochs: int = 3
    lr: float = 1e-3
    max_batches: int | None = None
    lsq: bool = True
    freeze_bn_epoch: int = 1
    freeze_observer_epoch: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.epochs < 0:
            raise UsageError(f"epochs={self.epochs} must be >= 1 (QAT epochs)")
        if self.max_batches is not None and self.max_batches < 1:
            raise UsageError(f"max_batches={self.max_batches} must be >= 1 (or None: every batch)")
        check_range("lr", self.lr, 0.0, 10.0, low_open=True)
        for name in ("freeze_bn_epoch", "freeze_observer_epoch"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise UsageError(f"{name}={value} must be >= 0 (an epoch index)")


@dataclass
class WeightOnlySettings(Config):
    """What only the weight-only algorithms (``algorithm="rtn" | "gptq" | "awq"``) read.

    Args:
        damp: GPTQ's dampening, a fraction of the Hessian's mean diagonal added to its diagonal.
        act_order: GPTQ quantizes columns in order of decreasing Hessian diagonal (groups stay contiguous along the
            input dim, with scales fixed from the float weight, so ``MatMulNBits`` runs the result unchanged).
        block_size: GPTQ's lazy-update block (columns).
        awq_grid: AWQ tries ``alpha`` in ``0, 1/grid, .., (grid-1)/grid`` for the scales ``mean|x| ** alpha``.
        max_rows: AWQ keeps at most this many calibration input rows per layer (evenly strided).
    """

    damp: float = 0.01
    act_order: bool = False
    block_size: int = 128
    awq_grid: int = 20
    max_rows: int = 4096

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("damp", self.damp, 0.0, 1.0, low_open=True)
        for name in ("block_size", "awq_grid", "max_rows"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name}={getattr(self, name)} must be >= 1")


#: the flat spellings ``QuantConfig`` takes for its sections' fields (``QuantConfig(adaround=True, epochs=3)``)
PTQ_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(PTQSettings))
QAT_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(QATSettings))


@dataclass(init=False)
class QuantConfig(Config):
    """What to quantize and how: the fields every method reads, then one section per method.

    Args:
        weight_bits: 1 (binary), 2 (ternary with ``scheme="ternary"``) .. 8.
        act_bits: activation bits (2..8), or None for weight-only quantization.
        method: ``dynamic`` (int8 weights, per-batch activation ranges; Linear only), ``ptq`` (calibration) or
            ``qat`` (quantization-aware training on the data passed to ``quantize``).
        scheme: ``symmetric`` / ``affine`` uniform weights, ``ternary`` (TWN) or ``binary`` (scaled sign).
        granularity, group_size: weight scales per tensor, per output channel or per group of input elements.
        observer: activation range estimator: minmax, moving_average, percentile, mse, histogram (KL); PTQ
            calibrates with it, QAT starts its ranges from it.
        overrides: ``{name or "re:pattern": {"weight_bits": 4, ...}}`` per layer.
        ignore: layer names or ``re:`` patterns kept in float.
        keep_first_last_8bit: first and last quantized layers use 8-bit symmetric weights (standard practice).
        calibration_batches, batch_size: calibration data used by PTQ and QAT (``batch_size`` also for QAT's
            training).
        fold_bn: fold BatchNorm into the preceding conv (PTQ before calibration, QAT after training).
        seed: AdaRound's batch sampling and QAT's training.
        ptq: ``PTQSettings`` (or a mapping of its fields): ``bias_correction``, ``adaround``, ``adaround_iters``,
            ``adaround_lr``.
        qat: ``QATSettings`` (or a mapping of its fields): ``epochs``, ``lr``, ``max_batches``, ``lsq``,
            ``freeze_bn_epoch``, ``freeze_observer_epoch``.
        algorithm: ``rtn``, ``gptq`` or ``awq``: weight-only block quantization of Linear layers (asymmetric
            codes with a scale and zero point per ``group_size`` input elements, 128 when 0; needs
            ``act_bits=None`` and ``weight_bits`` 4 or 8; the first / last layer get 8 bits unless
            ``keep_first_last_8bit=False``); ``export_onnx`` writes ONNX Runtime's ``MatMulNBits``. None: the
            ``method`` above.
        weight_only: ``WeightOnlySettings`` (or a mapping of its fields): ``damp``, ``act_order``, ``block_size``
            (GPTQ), ``awq_grid``, ``max_rows`` (AWQ).
        bias_correction, ..., freeze_observer_epoch: flat spellings of the section fields (keyword only, as in
            recipes); they are applied on top of ``ptq`` / ``qat``. ``config.epochs`` reads and writes
            ``config.qat.epochs``.

    ``to_dict`` writes the nested form (``{"weight_bits": 8, ..., "ptq": {...}, "qat": {"epochs": 3, ...}}``);
    ``from_dict`` reads it and the flat one (``{"method": "qat", "epochs": 3}``).

    Example:
        >>> cfg = QuantConfig(weight_bits=2, scheme="ternary", method="qat", epochs=3)
        >>> cfg.qat.epochs, cfg.epochs
        (3, 3)
        >>> cfg == QuantConfig(weight_bits=2, scheme="ternary", method="qat", qat=QATSettings(epochs=3))
        True
        >>> QuantConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    weight_bits: int = 8
    act_bits: int | None = 8
    method: Method = Method.PTQ
    scheme: Scheme = Scheme.SYMMETRIC
    granularity: Granularity = Granularity.PER_CHANNEL
    group_size: int = 0
    observer: ObserverKind = ObserverKind.MINMAX
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    ignore: tuple[str, ...] = ()
    keep_first_last_8bit: bool = True
    calibration_batches: int = 16
    batch_size: int = 64
    fold_bn: bool = True
    seed: int = 0
    ptq: PTQSettings = field(default_factory=PTQSettings)
    qat: QATSettings = field(default_factory=QATSettings)
    algorithm: WeightOnlyAlgorithm | None = None
    weight_only: WeightOnlySettings = field(default_factory=WeightOnlySettings)

    # the flat spellings of the section fields (not dataclass fields: no annotation)
    bias_correction = FlatField[bool]("ptq")
    adaround = FlatField[bool]("ptq")
    adaround_iters = FlatField[int]("ptq")
    adaround_lr = FlatField[float]("ptq")
    epochs = FlatField[int]("qat")
    lr = FlatField[float]("qat")
    max_batches = FlatField["int | None"]("qat")
    lsq = FlatField[bool]("qat")
    freeze_bn_epoch = FlatField[int]("qat")
    freeze_observer_epoch = FlatField["int | None"]("qat")

    def __init__(
        self,
        weight_bits: int = 8,
        act_bits: int | None = 8,
        method: Method | str = Method.PTQ,
        scheme: Scheme | str = Scheme.SYMMETRIC,
        granularity: Granularity | str = Granularity.PER_CHANNEL,
        group_size: int = 0,
        observer: ObserverKind | str = ObserverKind.MINMAX,
        overrides: dict[str, dict[str, Any]] | None = None,
        ignore: tuple[str, ...] | list[str] | str = (),
        keep_first_last_8bit: bool = True,
        calibration_batches: int = 16,
        batch_size: int = 64,
        fold_bn: bool = True,
        seed: int = 0,
        ptq: PTQSettings | dict[str, Any] | None = None,
        qat: QATSettings | dict[str, Any] | None = None,
        algorithm: WeightOnlyAlgorithm | str | None = None,
        weight_only: WeightOnlySettings | dict[str, Any] | None = None,
        *,
        bias_correction: bool | _Unset = UNSET,
        adaround: bool | _Unset = UNSET,
        adaround_iters: int | _Unset = UNSET,
        adaround_lr: float | _Unset = UNSET,
        epochs: int | _Unset = UNSET,
        lr: float | _Unset = UNSET,
        max_batches: int | _Unset | None = UNSET,
        lsq: bool | _Unset = UNSET,
        freeze_bn_epoch: int | _Unset = UNSET,
        freeze_observer_epoch: int | _Unset | None = UNSET,
    ) -> None:
        flat_ptq = {
            "bias_correction": bias_correction,
            "adaround": adaround,
            "adaround_iters": adaround_iters,
            "adaround_lr": adaround_lr,
        }
        flat_qat = {
            "epochs": epochs,
            "lr": lr,
            "max_batches": max_batches,
            "lsq": lsq,
            "freeze_bn_epoch": freeze_bn_epoch,
            "freeze_observer_epoch": freeze_observer_epoch,
        }
        self.weight_bits = weight_bits
        self.act_bits = act_bits
        self.method = typing.cast(Method, method)  # coerced (and checked) by Config.__post_init__
        self.scheme = typing.cast(Scheme, scheme)
        self.granularity = typing.cast(Granularity, granularity)
        self.group_size = group_size
        self.observer = typing.cast(ObserverKind, observer)
        self.overrides = {} if overrides is None else overrides
        self.ignore = typing.cast("tuple[str, ...]", ignore)
        self.keep_first_last_8bit = keep_first_last_8bit
        self.calibration_batches = calibration_batches
        self.batch_size = batch_size
        self.fold_bn = fold_bn
        self.seed = seed
        self.ptq = nested_config(
            PTQSettings, "QuantConfig", "ptq", ptq, {k: v for k, v in flat_ptq.items() if v is not UNSET}
        )
        self.qat = nested_config(
            QATSettings, "QuantConfig", "qat", qat, {k: v for k, v in flat_qat.items() if v is not UNSET}
        )
        self.algorithm = typing.cast("WeightOnlyAlgorithm | None", algorithm)
        self.weight_only = nested_config(WeightOnlySettings, "QuantConfig", "weight_only", weight_only, {})
        self.__post_init__()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.algorithm is not None:
            self._check_weight_only()
        if self.weight_bits == 1 and self.scheme is Scheme.SYMMETRIC:
            self.scheme = Scheme.BINARY  # 1 bit means binary (scaled sign)
        _check_bits(self.weight_bits, self.act_bits, self.scheme, "QuantConfig")
        if self.method is Method.DYNAMIC and (
            (self.weight_bits, self.act_bits, self.scheme) != (8, 8, Scheme.SYMMETRIC)
            or self.granularity is Granularity.PER_GROUP
        ):
            raise UsageError(
                "method='dynamic' runs int8 kernels: it needs weight_bits=8, act_bits=8, "
                "scheme='symmetric' and per-channel or per-tensor scales (got "
                f"{self.weight_bits}, {self.act_bits}, {self.scheme.value!r}, "
                f"{self.granularity.value!r}); "
                "use method='ptq' or 'qat' for other settings"
            )
        if self.granularity is Granularity.PER_GROUP and self.group_size < 1:
            raise UsageError(f"granularity='per_group' needs group_size >= 1, got {self.group_size}")
        if self.calibration_batches < 1:
            raise UsageError(f"calibration_batches={self.calibration_batches} must be >= 1")
        if self.batch_size < 1:
            raise UsageError(f"batch_size={self.batch_size} must be >= 1")
        if self.method is Method.QAT and self.qat.epochs < 1:
            raise UsageError(f"epochs={self.qat.epochs} must be >= 1 (QAT epochs)")
        if self.group_size < 0:
            raise UsageError(f"group_size={self.group_size} must be >= 0")
        if self.ptq.adaround and self.method is not Method.PTQ:
            raise UsageError(
                f"adaround=True needs method='ptq' (got {self.method.value!r}); QAT learns the weights themselves"
            )
        for key, spec in self.overrides.items():
            if not isinstance(spec, dict):
                raise UsageError(f"overrides[{key!r}] must be a dict like {{'weight_bits': 4}}, got {spec!r}")
            unknown = set(spec) - OVERRIDE_KEYS
            if unknown:
                raise UsageError(
                    f"overrides[{key!r}]: unknown keys {sorted(map(str, unknown))}; allowed {sorted(OVERRIDE_KEYS)}"
                )
            self.overrides[key] = _override_spec(key, spec)

    def _check_weight_only(self) -> None:
        """Weight-only block quantization: asymmetric per-group codes, no activation quantization (``MatMulNBits``
        dequantizes ``(code - zero_point) * scale`` per block of ``group_size`` input elements)."""
        algorithm = typing.cast(WeightOnlyAlgorithm, self.algorithm).value
        if self.act_bits is not None:
            raise UsageError(
                f"algorithm={algorithm!r} is weight-only (MatMulNBits keeps activations in float): it needs "
                f"act_bits=None, got act_bits={self.act_bits}; use method='ptq' without algorithm for int8 activations"
            )
        if self.weight_bits not in WEIGHT_ONLY_BITS:
            raise UsageError(
                f"algorithm={algorithm!r} needs weight_bits 4 or 8 (what MatMulNBits runs), got {self.weight_bits}"
            )
        if self.method is not Method.PTQ:
            raise UsageError(
                f"algorithm={algorithm!r} is post-training weight-only quantization: it needs method='ptq' "
                f"(the default), got method={Method(self.method).value!r}"
            )
        if Scheme(self.scheme) not in (Scheme.SYMMETRIC, Scheme.AFFINE):
            raise UsageError(
                f"algorithm={algorithm!r} writes asymmetric codes with zero points: scheme must be 'affine' "
                f"(or the default 'symmetric', which it replaces), got {Scheme(self.scheme).value!r}"
            )
        if self.group_size == 0:
            self.group_size = WEIGHT_ONLY_GROUP
        check_group_size(self.group_size, f"algorithm={algorithm!r}")
        self.scheme, self.granularity = Scheme.AFFINE, Granularity.PER_GROUP


def check_group_size(group_size: int, where: str) -> None:
    """``MatMulNBits`` blocks are a power of two >= 16 input elements; a layer whose input size is not a multiple
    is padded with zeros (its last block is partly empty), so any input size works."""
    if (
        isinstance(group_size, bool)
        or not isinstance(group_size, int)
        or group_size < 16
        or group_size & (group_size - 1)
    ):
        raise UsageError(
            f"{where}: group_size={group_size!r} must be a power of two >= 16 (MatMulNBits' block size: 16, 32, "
            "64, 128, ...); input sizes that are not a multiple of it are padded"
        )


def _override_spec(key: str, spec: dict[str, Any]) -> dict[str, Any]:
    """One override's values checked against the QuantConfig fields of the same names (enums as their values)."""
    hints = typing.get_type_hints(QuantConfig)
    checked = {}
    for name, value in spec.items():
        value = check_type(f"overrides[{key!r}].{name}", value, hints[name])
        checked[name] = value.value if isinstance(value, enum.Enum) else value
    if "weight_bits" in checked:
        check_range(f"overrides[{key!r}].weight_bits", checked["weight_bits"], 1, 8)
    if checked.get("act_bits") is not None:
        check_range(f"overrides[{key!r}].act_bits", checked["act_bits"], 2, 8)
    if checked.get("group_size", 0) < 0:
        raise UsageError(f"overrides[{key!r}].group_size={checked['group_size']} must be >= 0")
    return checked


def _check_bits(weight_bits: int, act_bits: int | None, scheme: Scheme | str, where: str) -> None:
    scheme = Scheme(scheme)
    check_range(f"{where}: weight_bits", weight_bits, 1, 8)
    if act_bits is not None:
        check_range(f"{where}: act_bits", act_bits, 2, 8)
    if weight_bits == 1 and scheme is not Scheme.BINARY:
        raise UsageError(f"{where}: weight_bits=1 needs scheme='binary' (got {scheme.value!r})")
    if scheme is Scheme.BINARY and weight_bits != 1:
        raise UsageError(f"{where}: scheme='binary' needs weight_bits=1 (got {weight_bits})")
    if scheme is Scheme.TERNARY and weight_bits != 2:
        raise UsageError(f"{where}: scheme='ternary' needs weight_bits=2 (got {weight_bits})")


@dataclass
class LayerSpec:
    """The resolved quantization of one layer (JSON-safe through ``to_dict``)."""

    name: str
    kind: str
    weight_bits: int
    scheme: str
    granularity: str
    group_size: int
    act_bits: int | None
    dynamic: bool
    output_act_bits: int | None = None  # 8: the output is quantized too (it feeds a residual add)

    def __post_init__(self) -> None:
        """Check every field: a spec may come from an artifact's manifest (``replay``), not only from ``plan``."""
        hints = typing.get_type_hints(LayerSpec)
        where = f"quantization layer {self.name!r}" if isinstance(self.name, str) else "quantization layer"
        for name in self.__dataclass_fields__:
            setattr(self, name, check_type(f"{where}: {name}", getattr(self, name), hints[name]))
        _check_bits(self.weight_bits, self.act_bits, self.scheme, where)
        if self.output_act_bits is not None:
            check_range(f"{where}: output_act_bits", self.output_act_bits, 2, 8)
        if self.granularity not in {g.value for g in Granularity}:
            raise UsageError(
                f"{where}: granularity={self.granularity!r} is not one of {', '.join(g.value for g in Granularity)}"
            )
        if self.group_size < 0 or (self.granularity == Granularity.PER_GROUP.value and self.group_size < 1):
            raise UsageError(f"{where}: group_size={self.group_size} must be >= 1 for per_group (>= 0 otherwise)")

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def unsupported(module: nn.Module) -> str | None:
    """Why ``dynamic.decompose`` cannot rebuild ``module`` as Linear layers (None when it can)."""
    if isinstance(module, nn.LSTM) and module.proj_size:
        return "LSTM with proj_size > 0 is not supported"
    if isinstance(module, nn.MultiheadAttention) and (module.bias_k is not None or module.add_zero_attn):
        return "MultiheadAttention with add_bias_kv / add_zero_attn is not supported"
    if not isinstance(module, nn.LSTM | nn.GRU | nn.MultiheadAttention):
        return f"{type(module).__name__} is not supported"
    return None


def quantizable(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], dict[str, str]]:
    """``(Linear/Conv2d layers in module order, {name: reason} for layers left in float)``."""
    layers: list[tuple[str, nn.Module]] = []
    skipped: dict[str, str] = {}
    inside_mha: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside_mha):
            continue
        if isinstance(module, nn.MultiheadAttention | nn.LSTM | nn.GRU | nn.RNN):
            inside_mha.append(name)
            if unsupported(module):
                reason = str(unsupported(module))
            elif isinstance(module, nn.MultiheadAttention):  # every method decomposes it unless it is ignored
                reason = "MultiheadAttention named in ignore: left whole"
            else:
                reason = (
                    f"{type(module).__name__} is not supported by static quantization (method='dynamic' quantizes it)"
                )
            skipped[name] = f"{reason}; kept in float"
        elif isinstance(module, nn.Linear | nn.Conv2d):
            layers.append((name, module))
        elif isinstance(module, nn.Conv1d | nn.Conv3d | nn.ConvTranspose2d | nn.Embedding) or _has_matrix(module):
            skipped[name] = f"{type(module).__name__} is not supported; kept in float"
    return layers, skipped


def _has_matrix(module: nn.Module) -> bool:
    """A module of a kind not listed above that owns a weight matrix (a transformers ``Conv1D`` where it is not made
    a Linear, a user's own layer): never left in float without saying so."""
    weight = module._parameters.get("weight")
    return weight is not None and weight.ndim >= 2


def _plan_embeddings(model: nn.Module, cfg: QuantConfig, skipped: dict[str, str]) -> list[LayerSpec]:
    """Specs for the ``nn.Embedding`` tables (``quantizable`` lists them as skipped; those planned leave that list):
    weight-only, symmetric, one scale per row; 8 bits unless ``keep_first_last_8bit=False`` (an embedding is the
    model's first layer) or an override says otherwise. QAT keeps them float; the weight-only algorithms plan them
    here as PTQ does."""
    specs = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Embedding) or name not in skipped:
            continue
        if any(matches(name, p) for p in cfg.ignore):
            skipped[name] = "ignored by config"
            continue
        if cfg.method is Method.QAT:
            skipped[name] = "Embedding: quantized after training (method='dynamic' or 'ptq'), not by QAT; kept in float"
            continue
        if module.max_norm is not None:
            skipped[name] = "Embedding with max_norm renormalises its weight on lookup; kept in float"
            continue
        bits = 8
        if not cfg.keep_first_last_8bit and cfg.scheme is Scheme.SYMMETRIC and cfg.weight_bits >= 2:
            bits = cfg.weight_bits
        spec: dict[str, Any] = {"weight_bits": bits, "granularity": Granularity.PER_CHANNEL.value}
        for pattern, override in cfg.overrides.items():
            if matches(name, pattern):
                spec.update({k: (v.value if isinstance(v, enum.Enum) else v) for k, v in override.items()})
        if (
            spec.get("act_bits") is not None
            or spec.get("scheme", "symmetric") != "symmetric"
            or spec["granularity"] not in (Granularity.PER_CHANNEL.value, Granularity.PER_TENSOR.value)
            or spec["weight_bits"] < 2
        ):
            raise UsageError(
                f"quantize: Embedding {name!r} is quantized weight-only, symmetric, per row (per_channel) or "
                f"per_tensor with 2-8 bits; the override gives {spec}"
            )
        specs.append(
            LayerSpec(name, "Embedding", spec["weight_bits"], "symmetric", spec["granularity"], 0, None, False)
        )
        del skipped[name]
    return specs


def plan_layers(
    model: nn.Module, cfg: QuantConfig, decomposed: list[str] | tuple[str, ...] = ()
) -> tuple[list[LayerSpec], dict[str, str]]:
    """Resolve every quantizable layer's spec from the config (ignore, first/last rule, overrides). A pattern that
    names a ``decomposed`` LSTM / GRU / attention module applies to its Linear pieces, as a pattern naming any
    module covers the modules inside it (``slimkit._modules.matches``)."""

    def hits(name: str, pattern: str) -> bool:
        return matches(name, pattern)

    layers, skipped = quantizable(model)
    tables = _plan_embeddings(model, cfg, skipped)
    for pattern in [*cfg.ignore, *cfg.overrides]:
        if not any(hits(n, pattern) for n in [*(n for n, _ in layers), *skipped, *(t.name for t in tables)]):
            names = ", ".join(n for n, _ in layers[:8])
            raise UsageError(f"quantize: {pattern!r} matches no Linear/Conv2d layer; layers are: {names}")
    dynamic = cfg.method is Method.DYNAMIC
    specs = []
    ends = {layers[0][0], layers[-1][0]} if layers else set()
    for name, module in layers:
        if any(hits(name, p) for p in cfg.ignore):
            skipped[name] = "ignored by config"
            continue
        if dynamic and not isinstance(module, nn.Linear):
            skipped[name] = "dynamic quantization covers Linear layers only; kept in float"
            continue
        spec: dict[str, Any] = {
            "weight_bits": cfg.weight_bits,
            "act_bits": cfg.act_bits,
            "scheme": cfg.scheme.value,
            "granularity": cfg.granularity.value,
            "group_size": cfg.group_size,
        }
        if cfg.keep_first_last_8bit and name in ends and (cfg.weight_bits < 8 or cfg.scheme.value != "symmetric"):
            spec.update(weight_bits=8, scheme="symmetric", granularity="per_channel")
            if spec["act_bits"] is not None:
                spec["act_bits"] = max(spec["act_bits"], 8)
        for pattern, override in cfg.overrides.items():
            if hits(name, pattern):
                spec.update({k: (v.value if isinstance(v, enum.Enum) else v) for k, v in override.items()})
        if spec["weight_bits"] == 1 and spec["scheme"] == "symmetric":
            spec["scheme"] = "binary"
        if dynamic and (
            (spec["weight_bits"], spec["act_bits"], spec["scheme"]) != (8, 8, "symmetric")
            or spec["granularity"] == "per_group"
        ):
            raise UsageError(
                f"quantize: layer {name!r}: method='dynamic' needs 8-bit symmetric per-channel or "
                "per-tensor weights and 8-bit activations; drop the override or use method='ptq' / 'qat'"
            )
        _check_bits(spec["weight_bits"], spec["act_bits"], spec["scheme"], f"layer {name!r}")
        specs.append(
            LayerSpec(
                name,
                type(module).__name__,
                spec["weight_bits"],
                spec["scheme"],
                spec["granularity"],
                spec["group_size"],
                spec["act_bits"],
                dynamic,
            )
        )
    specs = tables + specs
    planned = {spec.name for spec in specs}
    for pattern in cfg.overrides:  # a layer the user configured must be quantized, or the reason is an error
        hit = [n for n in skipped if hits(n, pattern) and skipped[n] != "ignored by config"]
        if hit and not any(hits(n, pattern) for n in planned):
            raise UsageError(
                f"quantize: overrides[{pattern!r}] targets {hit[0]!r}, which cannot be quantized here: "
                f"{skipped[hit[0]]}"
            )
    return specs, skipped
