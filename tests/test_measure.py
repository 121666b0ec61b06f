import torch
from torch import nn

from slimkit import measure


def test_linear_and_conv_macs_exact():
    assert measure.profile(nn.Linear(30, 7), torch.zeros(4, 30)).macs == 4 * 30 * 7
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, groups=1)
    # output 8x16x16, each output element needs 3*3*3 MACs
    assert measure.profile(conv, torch.zeros(1, 3, 32, 32)).macs == 8 * 16 * 16 * 27
    grouped = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    assert measure.profile(grouped, torch.zeros(1, 8, 10, 10)).macs == 8 * 10 * 10 * 9


def test_attention_macs():
    mha = nn.MultiheadAttention(16, 2, batch_first=True)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    seq, dim = 5, 16
    expected = seq * dim * 3 * dim + seq * seq * dim * 2 + seq * dim * dim
    prof = measure.profile(Wrap(), torch.zeros(1, seq, dim))
    assert prof.macs == expected
    assert prof.layers[0].name == "mha" and prof.layers[0].macs == expected


def test_params_nonzero_and_size():
    lin = nn.Linear(10, 10)
    with torch.no_grad():
        lin.weight[:5] = 0
    total, nonzero = measure.count_params(lin)
    assert total == 110 and nonzero == 110 - 50 - int((lin.bias == 0).sum())
    assert 440 <= measure.size_on_disk(lin) < 440 + 400  # 110 float32 + a small header
    flops = measure.profile(nn.Sequential(nn.Linear(10, 10), nn.ReLU()), torch.zeros(1, 10)).flops
    assert flops == 2 * 100 + 10


def test_peak_memory_counts_activations():
    small = measure.peak_memory(nn.Linear(10, 10), torch.zeros(1, 10))
    big = measure.peak_memory(nn.Linear(10, 10), torch.zeros(4096, 10))
    assert small >= 440 and big - small >= 4096 * 10 * 4 * 0.9


def test_latency_harness_orders_models():
    fast = nn.Linear(8, 8)
    slow = nn.Sequential(*[nn.Linear(256, 256) for _ in range(12)], nn.Linear(256, 8))
    x = torch.zeros(1, 8)
    cmp = measure.compare_latency(nn.Sequential(nn.Linear(8, 256), slow), fast, x, batch_sizes=(1, 16), repeats=7,
                                  warmup=1, threads=1)
    assert set(cmp.speedup) == {1, 16}
    assert all(s > 1 for s in cmp.speedup.values())  # the single Linear beats 14 wide layers
    stats = cmp.b[16]
    assert stats.runs >= 5 and stats.p25 <= stats.median <= stats.p75 and stats.throughput > 0
    assert "speed-up" in str(cmp)
    assert torch.get_num_threads() == 1  # restored
