"""Structured pruning that physically removes channels, heads and neurons.

``prune(model, PruneConfig(...), example_input)`` traces the model (torch.fx), groups coupled channels
(residual adds, concat, depthwise convs, flatten -> Linear, attention heads), scores them, allocates a ratio per
group to reach the asked MACs/params/channels reduction, and cuts a copy of the model. With data and
``steps > 1`` (or ``finetune``) it runs the iterative prune -> fine-tune -> evaluate loop.

Example:
    >>> import slimkit, torch
    >>> model = slimkit.models.create("resnet20")
    >>> result = slimkit.prune(model, slimkit.PruneConfig(amount=0.5, target="macs"), torch.zeros(1, 3, 32, 32))
    >>> round(result.record["reduction"]["macs"], 2)
    0.5
"""

from slimkit.pruning.config import Allocation, Importance, PruneConfig, Target
from slimkit.pruning.core import PruneResult, apply_record, apply_record_, replay
from slimkit.pruning.graph import Group, build_graph, register_graph_handler
from slimkit.pruning.importance import CRITERIA, l1_penalty, register_importance
from slimkit.pruning.schedule import prune
from slimkit.pruning.sensitivity import SensitivityResult, sensitivity
from slimkit.pruning.sparse import SparseResult, SparsityConfig, SparsityMode, pack_sparse, sparsify, unpack_sparse
from slimkit.pruning.surgery import register_surgery

__all__ = [
    "CRITERIA",
    "Allocation",
    "Group",
    "Importance",
    "PruneConfig",
    "PruneResult",
    "SensitivityResult",
    "SparseResult",
    "SparsityConfig",
    "SparsityMode",
    "Target",
    "apply_record",
    "apply_record_",
    "build_graph",
    "l1_penalty",
    "pack_sparse",
    "prune",
    "register_graph_handler",
    "register_importance",
    "register_surgery",
    "replay",
    "sensitivity",
    "sparsify",
    "unpack_sparse",
]
