"""Hypothesis: random residual / concat / depthwise / grouped-conv networks prune correctly.

For a random network and ratio, prune with random importance, then zero (in a copy of the original) exactly the
channels the record removes: the zeroed original and the pruned copy of it must compute the same outputs.
"""

import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from slimkit.pruning import PruneConfig, apply_record, prune
from slimkit.pruning.surgery import decode_indices


def _bn(c):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


class Block(nn.Module):
    def __init__(self, kind: str, c: int, width: int) -> None:
        super().__init__()
        self.kind = kind
        if kind == "res":
            self.a = nn.Sequential(
                nn.Conv2d(c, width, 3, padding=1, bias=False),
                _bn(width),
                nn.ReLU(),
                nn.Conv2d(width, c, 3, padding=1, bias=False),
                _bn(c),
            )
            self.out = c
        elif kind == "cat":
            self.a = nn.Sequential(nn.Conv2d(c, width, 1, bias=False), _bn(width), nn.ReLU())
            self.b = nn.Sequential(nn.Conv2d(c, width + 1, 3, padding=1, bias=False), _bn(width + 1), nn.ReLU())
            self.out = 2 * width + 1
        elif kind == "dw":
            self.a = nn.Sequential(
                nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False),
                _bn(c),
                nn.ReLU(),
                nn.Conv2d(c, width, 1, bias=False),
                _bn(width),
                nn.ReLU(),
            )
            self.out = width
        elif kind == "grp":  # ResNeXt-style: grouped 3x3 with 2 channels per group, whole groups removed
            self.a = nn.Sequential(
                nn.Conv2d(c, 2 * width, 1, bias=False),
                _bn(2 * width),
                nn.ReLU(),
                nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=width, bias=False),
                _bn(2 * width),
                nn.ReLU(),
            )
            self.out = 2 * width
        else:
            self.a = nn.Sequential(nn.Conv2d(c, width, 3, padding=1, bias=False), _bn(width), nn.ReLU())
            self.out = width

    def forward(self, x):
        if self.kind == "res":
            return torch.relu(x + self.a(x))
        if self.kind == "cat":
            return torch.cat([self.a(x), self.b(x)], dim=1)
        return self.a(x)


class RandomNet(nn.Module):
    def __init__(self, stem: int, blocks: list[tuple[str, int]]) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, stem, 3, padding=1, bias=False), _bn(stem), nn.ReLU())
        layers, c = [], stem
        for kind, width in blocks:
            layers.append(Block(kind, c, width))
            c = layers[-1].out
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(c * 4, 5)

    def forward(self, x):
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 2), 1))


def _zero_removed(model: nn.Module, record: dict) -> None:
    """Zero, in ``model``, every output channel (and its norm/depthwise entries) the record removes."""
    with torch.no_grad():
        for name, edit in record["modules"].items():
            module = model.get_submodule(name)
            is_through = isinstance(module, nn.BatchNorm2d) or (isinstance(module, nn.Conv2d) and module.groups > 1)
            key = "in" if is_through else "out"
            if edit[key] is None:
                continue
            size = (
                module.num_features
                if isinstance(module, nn.BatchNorm2d)
                else (module.in_channels if key == "in" else module.weight.shape[0])
            )
            removed = torch.ones(size, dtype=torch.bool)
            removed[decode_indices(edit[key])] = False
            module.weight[removed] = 0
            if module.bias is not None:
                module.bias[removed] = 0


@settings(max_examples=12, deadline=None)
@given(
    stem=st.integers(4, 8),
    blocks=st.lists(
        st.tuples(st.sampled_from(["res", "cat", "dw", "grp", "plain"]), st.integers(4, 8)), min_size=1, max_size=4
    ),
    ratio=st.floats(0.3, 0.8),
    seed=st.integers(0, 1000),
)
def test_random_networks_prune_like_zeroing(stem, blocks, ratio, seed):
    torch.manual_seed(seed)
    model = RandomNet(stem, blocks).eval()
    x = torch.randn(2, 3, 6, 6)
    result = prune(model, PruneConfig(amount=ratio, target="channels", importance="random", seed=seed), x)
    zeroed = RandomNet(stem, blocks).eval()
    zeroed.load_state_dict(model.state_dict())
    _zero_removed(zeroed, result.record)
    pruned_zeroed = apply_record(copy.deepcopy(zeroed), result.record)  # the same cut, on the zeroed weights
    assert all(g["kept"] < g["size"] for g in result.record["groups"])  # every group lost channels
    assert torch.allclose(pruned_zeroed(x), zeroed(x), atol=1e-5, rtol=1e-5)
    assert torch.allclose(result.model(x), zeroed(x), atol=1e-5, rtol=1e-5)
