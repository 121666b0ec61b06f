"""Grouped convolutions (whole groups removed), plain q/k/v Linear attention (whole heads removed, num_heads
rewritten), and surgery of Conv1d / ConvTranspose2d / GroupNorm / PReLU through the graph."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimkit
from slimkit.export.onnx import export_onnx
from slimkit.export.runtime import OrtModel
from slimkit.pruning import PruneConfig, build_graph, prune, replay


# -- small hand-written models -------------------------------------------------------------------------------------
class NeXtBlock(nn.Module):
    """ResNeXt bottleneck: 1x1 -> grouped 3x3 -> 1x1, residual add."""

    def __init__(self, cin: int, width: int, groups: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = (
            None
            if cin == cout and stride == 1
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class TinyNeXt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(NeXtBlock(16, 32, 8, 32), NeXtBlock(32, 32, 8, 32), NeXtBlock(32, 48, 4, 64, 2))
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


class QKVAttention(nn.Module):
    """timm-style attention: fused ``qkv`` or separate ``q``/``k``/``v`` Linears, reshape into heads."""

    def __init__(self, dim: int, num_heads: int, fused: bool, sdpa: bool = False, merge_width: bool = False):
        super().__init__()
        self.num_heads, self.head_dim, self.fused, self.sdpa = num_heads, dim // num_heads, fused, sdpa
        self.merge_width = merge_width
        if fused:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        if self.fused:
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        else:
            q, k, v = (m(x).view(B, N, self.num_heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
            out = attn.softmax(dim=-1) @ v
        # merge_width: the timm idiom reshape(B, N, C) ties the width to the residual stream (not rewritable)
        return self.proj(out.transpose(1, 2).reshape(B, N, C if self.merge_width else -1))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, **kw) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), QKVAttention(dim, heads, **kw)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, merge_width: bool = False) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.pos = nn.Parameter(torch.randn(1, 16, dim) * 0.02)
        self.blocks = nn.Sequential(
            Block(dim, heads, fused=True, merge_width=merge_width),
            Block(dim, heads, fused=False),
            Block(dim, heads, fused=False, sdpa=True),
        )
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))


class ConvOdds(nn.Module):
    """Conv1d -> GroupNorm -> PReLU(per channel) -> Conv1d and Conv2d -> ConvTranspose2d -> BN -> PReLU -> Conv2d."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.gn, self.act1 = nn.Conv1d(3, 16, 3), nn.GroupNorm(4, 16), nn.PReLU(16)
        self.c2 = nn.Conv1d(16, 8, 3)
        self.d1, self.up = nn.Conv2d(3, 12, 3, padding=1), nn.ConvTranspose2d(12, 10, 2, stride=2)
        self.bn, self.act2, self.d2 = nn.BatchNorm2d(10), nn.PReLU(10), nn.Conv2d(10, 4, 3)
        self.gup = nn.ConvTranspose2d(4, 4, 1, groups=2)  # grouped transposed conv with in == out
        self.fc = nn.Linear(8 + 4, 5)

    def forward(self, x):
        a = self.c2(self.act1(self.gn(self.c1(x.flatten(2)[:, :, :40])))).mean(-1)
        b = self.gup(self.d2(self.act2(self.bn(self.up(self.d1(x)))))).mean((2, 3))
        return self.fc(torch.cat([a, b], 1))


def _randomize_norms(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if isinstance(m, nn.BatchNorm2d | nn.GroupNorm | nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


def _zero_every_other_unit(model, x):
    """Zero every other unit of every prunable group in all its producers (rows, fused q/k/v parts) and
    norms/grouped convs it passes through; returns ``{group id: zeroed channels}``."""
    zeroed = {}
    with torch.no_grad():
        for group in build_graph(model, x).groups:
            units = torch.arange(group.units // 2) * 2
            chans = (units[:, None] * group.unit + torch.arange(group.unit)).flatten()
            zeroed[group.id] = set(chans.tolist())
            for member in group.members:
                module = group.modules[member.module]
                if member.role == "out":
                    rows = torch.cat([chans + part * group.size for part in range(member.copies)])
                    weight = module.weight.transpose(0, 1) if isinstance(module, nn.ConvTranspose2d) else module.weight
                    weight[rows] = 0
                    if module.bias is not None:
                        module.bias[rows] = 0
                elif member.role == "through" and not isinstance(module, nn.PReLU):
                    module.weight[chans + member.offset] = 0
                    if module.bias is not None:
                        module.bias[chans + member.offset] = 0
    return zeroed


CASES = {
    "nextnet": (TinyNeXt, (2, 3, 16, 16)),
    "vit": (TinyViT, (2, 3, 16, 16)),
    "odds": (ConvOdds, (2, 3, 8, 8)),
}
# modules that must be pruned (members of a prunable group), not kept intact
MUST_PRUNE = {
    "nextnet": {"blocks.0.conv2", "blocks.1.conv2", "blocks.2.conv2"},
    "vit": {"blocks.0.attn.qkv", "blocks.1.attn.q", "blocks.1.attn.k", "blocks.2.attn.v", "blocks.2.attn.proj"},
    "odds": {"c1", "gn", "act1", "up", "bn", "act2", "gup"},
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_zeroed_units_are_the_ones_removed(name):
    build, shape = CASES[name]
    torch.manual_seed(0)
    model = _randomize_norms(build())
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    zeroed = _zero_every_other_unit(model, x)
    reference = model(x)
    result = prune(model, PruneConfig(amount=0.5, target="channels", importance="l2", max_sparsity=0.5, round_to=1), x)
    assert MUST_PRUNE[name] <= {m for g in result.record["groups"] if g["kept"] < g["size"] for m in g["members"]}
    for group in result.record["groups"]:
        kept = set(torch.cat([torch.arange(a, b) for a, b in group["keep"]]).tolist())
        assert kept.isdisjoint(zeroed[group["id"]]), group["id"]
        assert len(kept) == group["size"] - len(zeroed[group["id"]]), group["id"]
    torch.testing.assert_close(result.model(x), reference, atol=1e-5, rtol=1e-5)


def test_grouped_conv_loses_whole_groups():
    model = TinyNeXt()
    x = torch.randn(2, 3, 16, 16)
    group = next(g for g in build_graph(model, x).groups if "blocks.0.conv2" in g.names)
    assert group.unit == 4 and {"blocks.0.conv1", "blocks.0.bn1", "blocks.0.bn2", "blocks.0.conv3"} <= set(group.names)
    pruned = prune(model, PruneConfig(amount=0.5, target="channels"), x).model
    for block, per in zip(pruned.blocks, (4, 4, 12)):
        conv = block.conv2
        assert conv.in_channels == conv.out_channels == conv.groups * per == block.conv1.out_channels
        assert conv.weight.shape[1] == per and conv.groups < {4: 8, 12: 4}[per]


def test_heads_removed_whole_and_num_heads_rewritten():
    model = TinyViT()
    x = torch.randn(2, 3, 16, 16)
    heads = [g for g in build_graph(model, x).groups if g.unit == 8]
    assert len(heads) == 3
    assert {"blocks.0.attn.qkv", "blocks.0.attn.proj"} <= set(heads[0].names)
    assert {"blocks.1.attn.q", "blocks.1.attn.k", "blocks.1.attn.v", "blocks.1.attn.proj"} <= set(heads[1].names)
    assert heads[0].attrs == [("blocks.0.attn", "num_heads", 8)]
    result = prune(model, PruneConfig(amount=0.5, target="channels"), x)
    for block in result.model.blocks:
        attn = block.attn
        assert attn.num_heads == 2 and attn.proj.in_features == 16
        assert (attn.qkv.out_features if attn.fused else attn.q.out_features) == (3 if attn.fused else 1) * 16
    assert result.record["modules"]["blocks.0.attn"]["attrs"] == {"num_heads": 2}
    assert model.blocks[0].attn.num_heads == 4  # the caller's model is untouched


def test_fixed_width_reshape_is_kept_intact_and_listed():
    model = TinyViT(merge_width=True).eval()
    x = torch.randn(2, 3, 16, 16)
    result = prune(model, PruneConfig(amount=0.5, target="channels"), x)
    intact = [k for k in result.record["kept_intact"] if k["group"] == "blocks.0.attn.qkv:out"]
    assert intact and any("fixed width" in r for r in intact[0]["reasons"])
    assert result.model.blocks[0].attn.qkv.out_features == 96 and result.model.blocks[0].attn.num_heads == 4
    assert result.model.blocks[1].attn.num_heads == 2
    assert result.model(x).shape == (2, 10)


def test_literal_head_count_without_attribute_is_kept_intact():
    class Literal(QKVAttention):
        def forward(self, x):
            B, N, _ = x.shape
            q, k, v = self.qkv(x).reshape(B, N, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
            return self.proj((q @ k.transpose(-2, -1)).softmax(-1).matmul(v).transpose(1, 2).reshape(B, N, -1))

    model = nn.Sequential(nn.Linear(6, 32), Literal(32, 4, fused=True)).eval()
    del model[1].num_heads
    x = torch.randn(2, 5, 6)
    graph = build_graph(model, x)
    assert [g.names for g in graph.groups] == [["0", "1.qkv"]]  # the embedding only
    intact = [k for k in graph.kept_intact if "1.qkv" in k["modules"]]
    assert intact and any("literal head count 4" in r for r in intact[0]["reasons"])
    result = prune(model, PruneConfig(amount=0.5, target="channels"), x)
    assert result.model[1].qkv.out_features == 96 and result.model[0].out_features == 16
    assert result.model(x).shape == (2, 5, 32)


@pytest.mark.parametrize("name", sorted(CASES))
def test_macs_target_replay_and_onnx(name, tmp_path):
    build, shape = CASES[name]
    torch.manual_seed(0)
    model = _randomize_norms(build())
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    result = prune(model, PruneConfig(amount=0.4, target="macs"), x)
    reduction = 1 - slimkit.profile(result.model, x).macs / slimkit.profile(model, x).macs
    assert abs(reduction - 0.4) <= 0.02 and abs(result.record["reduction"]["macs"] - reduction) < 1e-6
    fresh = replay(build(), json.loads(json.dumps(result.record)))
    fresh.load_state_dict(result.model.state_dict())
    y = result.model(x)
    assert torch.equal(fresh.eval()(x), y)
    path = export_onnx(result.model, x, tmp_path / f"{name}.onnx", int8=False)
    torch.testing.assert_close(OrtModel(path, threads=1)(x), y, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(torch.export.export(result.model, (x,)).module()(x), y, rtol=1e-5, atol=1e-5)


def test_torchvision_resnext50_prunes_groups(tmp_path):
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = tvm.resnext50_32x4d(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    result = prune(model, PruneConfig(amount=0.5, target="macs"), x)
    assert not [k for k in result.record["kept_intact"] if any("grouped" in r for r in k["reasons"])]
    assert abs(result.record["reduction"]["macs"] - 0.5) <= 0.02
    conv = result.model.layer1[0].conv2
    assert conv.groups < 32 and conv.in_channels == conv.out_channels == conv.groups * 4
    y = result.model(x)
    fresh = replay(tvm.resnext50_32x4d(num_classes=10), json.loads(json.dumps(result.record)))
    fresh.load_state_dict(result.model.state_dict())
    assert torch.equal(fresh.eval()(x), y)
    path = export_onnx(result.model, x, tmp_path / "resnext.onnx", int8=False)
    torch.testing.assert_close(OrtModel(path, threads=1)(x), y, rtol=1e-3, atol=1e-4)


def test_head_split_with_a_computed_head_dim_is_kept_intact():
    class Computed(QKVAttention):  # the older timm idiom: head_dim = C // num_heads of the residual width
        def forward(self, x):
            B, N, C = x.shape
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            return self.proj(((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(B, N, -1))

    graph = build_graph(Computed(32, 4, fused=True), torch.randn(2, 5, 32))
    intact = [k for k in graph.kept_intact if k["group"] == "qkv:out"]
    assert intact and any("computed size" in r for r in intact[0]["reasons"])
    assert not any("qkv" in g.names for g in graph.groups)


def test_iterative_steps_compose_head_counts():
    torch.manual_seed(0)
    model = TinyViT().eval()
    x = torch.randn(2, 3, 16, 16)
    result = prune(model, PruneConfig(amount=0.5, target="macs", steps=2), x)
    heads = [b.attn.num_heads for b in result.model.blocks]
    assert min(heads) < 4
    fresh = replay(TinyViT(), json.loads(json.dumps(result.record)))
    assert [b.attn.num_heads for b in fresh.blocks] == heads
    fresh.load_state_dict(result.model.state_dict())
    assert torch.equal(fresh.eval()(x), result.model(x))


@pytest.mark.parametrize("head_dim", [-1, 8])
def test_head_count_read_from_another_attribute_fails_clearly(head_dim):
    class Chunks(QKVAttention):  # num_heads and chunks are both 4; the reshape reads chunks, not num_heads
        def forward(self, x):
            B, N, _ = x.shape
            q, k, v = self.qkv(x).reshape(B, N, 3, self.chunks, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            return self.proj(((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(B, N, -1))

    model = Chunks(32, 4, fused=True)
    model.chunks = 4
    with pytest.raises(ValueError, match="reads is not that attribute"):
        prune(model, PruneConfig(amount=0.5, target="channels"), torch.randn(2, 5, 32))
    assert model.num_heads == 4 and model.qkv.out_features == 96  # the caller's model is untouched


@pytest.mark.parametrize("own", [True, False])
def test_reshape_sized_from_another_tensor_is_kept_intact(own):
    class Sized(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3), nn.Conv1d(8, 4, 1)

        def forward(self, x):
            a, b = self.a(x), self.b(x)
            width = a.shape[1] if own else b.shape[1]  # b's width: right only while a and b keep the same width
            return self.c(a.reshape(a.shape[0], width, -1)) + b.mean()

    model, x = Sized().eval(), torch.randn(2, 3, 6, 6)
    graph = build_graph(model, x)
    prunable = [g.names for g in graph.groups]
    if own:
        assert prunable == [["a", "c"]]
        assert prune(model, PruneConfig(amount=0.5, target="channels"), x).model(x).shape == (2, 4, 16)
    else:
        assert ["a", "c"] not in prunable
        reasons = next(k["reasons"] for k in graph.kept_intact if k["group"] == "a:out")
        assert any("computed elsewhere" in r for r in reasons)


class SplitQKV(nn.Module):
    """A fused ``qkv`` split into q, k, v by a size computed from the head attributes (not held by one attribute)."""

    def __init__(self, dim: int = 32, num_heads: int = 4):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).split(self.num_heads * self.head_dim, dim=-1)
        q, k, v = (t.view(B, N, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = (q @ k.transpose(-2, -1) * self.head_dim**-0.5).softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(B, N, -1))


def test_split_by_a_computed_width_follows_the_rewritten_head_count():
    torch.manual_seed(0)
    model, x = SplitQKV().eval(), torch.randn(2, 5, 32)
    result = prune(model, PruneConfig(amount=0.5, target="channels", round_to=1), x)
    attn = result.model
    assert attn.num_heads == 2 and attn.qkv.out_features == 3 * 16 and attn.proj.in_features == 16
    assert result.record["modules"][""]["attrs"] == {"num_heads": 2}
    assert result.model(x).shape == (2, 5, 32)
    assert torch.equal(prune(model, PruneConfig(amount=0.0), x).model(x), model(x))
