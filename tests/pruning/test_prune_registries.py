"""Extension points are used: a registered surgery and graph handler for a custom layer type, a registered
importance criterion (also by name, through a config round trip)."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimkit.errors import UsageError
from slimkit.pruning import PruneConfig, apply_record_, prune, register_importance, register_surgery
from slimkit.pruning.graph import (
    FUNCTION_HANDLERS,
    METHOD_HANDLERS,
    MODULE_HANDLERS,
    build_graph,
    register_graph_handler,
)
from slimkit.pruning.importance import CRITERIA
from slimkit.pruning.surgery import SURGERY


class Doubled(nn.Module):
    """A Linear layer of its own: ``2 * x @ weight.T`` (no bias); not a torch.nn type."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))

    def forward(self, x):
        return 2 * F.linear(x, self.weight)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(Doubled(6, 8), nn.ReLU(), nn.Linear(8, 3))


def by_index(group):
    """Scores rising with the unit index: the last units are kept."""
    return torch.arange(group.units, dtype=torch.float32)


@pytest.fixture
def registered():
    calls = []

    @register_graph_handler(Doubled)
    def doubled_flow(walker, node, x):
        name, module = str(node.target), walker.module_of(node)
        walker.read(name, x, "in")
        return walker.new_producer(name, module.weight.shape[0], x.chdim)

    @register_surgery(Doubled)
    def doubled_surgery(module, out_keep, in_keep):
        calls.append((None if out_keep is None else out_keep.tolist(), in_keep))
        weight = module.weight.detach()
        if out_keep is not None:
            weight = weight[out_keep]
        if in_keep is not None:
            weight = weight[:, in_keep]
        module.weight = nn.Parameter(weight.clone())
        return module

    register_importance("test_by_index")(by_index)
    yield calls
    MODULE_HANDLERS.pop(Doubled)
    SURGERY.pop(Doubled)
    CRITERIA.pop("test_by_index")


def test_custom_layer_is_kept_intact_without_registration():
    graph = build_graph(_model(), torch.zeros(1, 6))
    assert all("0" not in g.names for g in graph.groups)


def test_registered_surgery_and_importance_are_used(registered):
    model = _model()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    result = prune(model, PruneConfig(amount=0.5, target="channels", importance="test_by_index"), x)
    assert registered == [([4, 5, 6, 7], None)]  # the surgery ran, with the channels the criterion ranked highest
    assert result.record["groups"][0]["keep"] == [[4, 8]]
    w0, w2 = model[0].weight.detach(), model[2].weight.detach()
    expected = F.linear(torch.relu(2 * F.linear(x, w0[4:])), w2[:, 4:], model[2].bias.detach())
    assert torch.allclose(result.model(x), expected, atol=1e-6)
    assert result.record["config"]["importance"] == "test_by_index"
    clone = apply_record_(_model(), result.record)  # replay goes through the registered surgery too
    assert clone[0].weight.shape == (4, 6) and clone[2].weight.shape == (3, 4)


def test_registered_importance_round_trips_by_name(registered):
    cfg = PruneConfig(amount=0.5, target="channels", importance=by_index)  # the callable itself
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["importance"] == "test_by_index"
    again = PruneConfig.from_dict(data)
    assert again.importance == "test_by_index" and again.importance_name == "test_by_index"
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    kept = prune(model, again, torch.zeros(1, 6)).record["groups"][0]["keep"]
    assert kept == [[4, 8]]


def test_unregistered_callable_cannot_be_saved_but_still_prunes():
    def ad_hoc(group):
        return -torch.arange(group.units, dtype=torch.float32)

    cfg = PruneConfig(amount=0.5, target="channels", importance=ad_hoc)
    with pytest.raises(UsageError, match="ad_hoc.*not registered.*register_importance"):
        cfg.to_dict()
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    result = prune(model, cfg, torch.zeros(1, 6))
    assert result.record["groups"][0]["keep"] == [[0, 4]]
    assert result.record["config"]["importance"] == "ad_hoc"
    with pytest.raises(UsageError, match="importance='nope'"):
        PruneConfig(importance="nope")


def test_graph_handler_registration_checks_its_keys():
    with pytest.raises(UsageError, match="stage"):
        register_graph_handler(nn.ReLU, stage="later")
    with pytest.raises(TypeError):
        register_graph_handler(3)(lambda walker, node, x: x)
    assert torch.flatten in FUNCTION_HANDLERS and "view" in METHOD_HANDLERS and nn.Conv2d in MODULE_HANDLERS
