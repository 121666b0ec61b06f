"""Rebuild a Hugging Face transformers model from its config, for ``slimkit.load``, without running remote code.

An artifact of a transformers model names the factory ``slimkit.models.hf:from_config`` with the model's class name
and its config as a plain dict. Loading builds only a class that ``transformers`` itself exports (a
``PreTrainedModel`` subclass such as ``BertModel`` or ``LlamaForCausalLM``) from a config of that class's own
``model_type``; a config that points at code outside the package (``auto_map``, remote code) is refused. Nothing
is downloaded: the weights come from the artifact.

The config stored is the one the model had before slimkit changed its shapes: pruning writes the new head / FFN
counts into ``model.config`` and keeps the previous values in its record (``hf_config_before``), and ``load``
replays the pruning on the rebuilt original, which writes them again.

Example:
    >>> from transformers import BertConfig, BertModel                                     # doctest: +SKIP
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                              intermediate_size=64))                                  # doctest: +SKIP
    >>> spec = source(model)                                                                 # doctest: +SKIP
    >>> type(from_config(**spec["kwargs"])).__name__                                         # doctest: +SKIP
    'BertModel'
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from torch import nn

from slimkit.errors import UsageError

__all__ = ["FACTORY", "eager_attention", "from_config", "source"]

FACTORY = "slimkit.models.hf:from_config"
_UNSAFE_KEYS = ("auto_map", "trust_remote_code")


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Inside the block, the transformers models within ``model`` whose config asks for torch's fused SDPA attention
    run transformers' ``"eager"`` attention (the same math: MatMul, Softmax, MatMul); every config gets its own value
    back afterwards, also when the block raises.

    ONNX export uses it: torch's exporter writes SDPA out as a chain with NaN guards (``IsNaN`` / ``Where`` on every
    score), and ONNX Runtime ran all-MiniLM-L6-v2 at batch 64 x 128 tokens 7% faster from the eager graph. Models
    that read the config only when they are built (transformers before 4.48) keep the attention they were built with.

    Example:
        >>> with eager_attention(bert):                                     # doctest: +SKIP
        ...     bert.config._attn_implementation
        'eager'
    """
    modeling = sys.modules.get("transformers.modeling_utils")  # a transformers model means it is imported
    configs: dict[int, Any] = {}
    if modeling is not None:
        for module in model.modules():
            config = getattr(module, "config", None)
            if isinstance(module, modeling.PreTrainedModel) and getattr(config, "_attn_implementation", None) == "sdpa":
                configs[id(config)] = config  # nested models share their parent's config, or have their own
    try:
        for config in configs.values():
            config._attn_implementation = "eager"
        yield
    finally:
        for config in configs.values():
            config._attn_implementation = "sdpa"


def _transformers_class(name: str) -> type:
    import transformers

    cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise UsageError(
            f"model_class {name!r} is not a model class transformers exports (PreTrainedModel subclass); "
            "only those are rebuilt from a config"
        )
    return cls


def from_config(model_class: str, config: dict[str, Any]) -> nn.Module:
    """A new ``transformers.<model_class>`` built from ``config`` (random weights; ``slimkit.load`` loads them)."""
    cls = _transformers_class(model_class)
    if not isinstance(config, dict):
        raise UsageError(f"config of {model_class} must be a dict, got {type(config).__name__}")
    unsafe = [k for k in _UNSAFE_KEYS if config.get(k)]
    if unsafe:
        raise UsageError(f"the {model_class} config names remote code ({', '.join(unsafe)}); it is not built")
    config_class: Any = getattr(cls, "config_class")  # noqa: B009  (a PreTrainedModel class attribute)
    if config.get("model_type") != config_class.model_type:
        raise UsageError(
            f"config model_type {config.get('model_type')!r} does not match {model_class}'s {config_class.model_type!r}"
        )
    fields = {k: v for k, v in config.items() if k != "transformers_version"}
    return cls(config_class.from_dict(fields)).eval()


def source(model: nn.Module) -> dict[str, Any] | None:
    """``{"factory": FACTORY, "kwargs": {...}}`` for a model of a class transformers exports (None otherwise): the
    config before slimkit's pruning changed it, so replaying the history rebuilds the same shapes."""
    from slimkit.history import history_of

    try:
        import transformers
    except ImportError:
        return None
    name = type(model).__name__
    if not isinstance(model, transformers.PreTrainedModel) or getattr(transformers, name, None) is not type(model):
        return None
    config = model.config.to_dict()
    for step in reversed(history_of(model)):
        config.update(step.get("record", {}).get("hf_config_before") or {})
    return {"factory": FACTORY, "kwargs": {"model_class": name, "config": config}}
