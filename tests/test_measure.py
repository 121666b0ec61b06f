import pytest
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


def test_latency_harness_reports_the_ratio_of_medians(monkeypatch):
    """A fake clock makes every call cost a known time: the harness must report exactly those medians."""
    clock = {"now": 0.0}
    monkeypatch.setattr(measure.time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(measure.time, "sleep", lambda s: None)

    def costs(ms_per_sample):
        def run(x):
            clock["now"] += ms_per_sample * 1e-3 * x.shape[0]

        return run

    cmp = measure.compare_latency(
        costs(3.0), costs(1.0), torch.zeros(1, 8), batch_sizes=(1, 16), repeats=7, warmup=1, threads=1, min_seconds=0
    )
    assert cmp.speedup == {1: pytest.approx(3.0), 16: pytest.approx(3.0)}
    stats = cmp.b[16]
    assert stats.runs == 7 and stats.median == pytest.approx(16e-3) and stats.stdev == pytest.approx(0, abs=1e-12)
    assert stats.throughput == pytest.approx(1000.0)


def test_latency_harness_times_real_models():
    """The same harness on real modules: every batch size timed, spread ordered (no claim about which is faster)."""
    x = torch.zeros(1, 8)
    cmp = measure.compare_latency(
        nn.Linear(8, 8),
        nn.Sequential(nn.Linear(8, 64), nn.Linear(64, 8)),
        x,
        batch_sizes=(1, 16),
        repeats=5,
        warmup=1,
        threads=1,
    )
    assert set(cmp.a) == set(cmp.b) == {1, 16}
    for stats in (*cmp.a.values(), *cmp.b.values()):
        assert stats.runs >= 5 and 0 < stats.p25 <= stats.median <= stats.p75
    assert "speed-up" in str(cmp)
    assert torch.get_num_threads() == 1  # restored


def test_count_macs_is_what_profile_and_pruning_count():
    from slimkit.models import create
    from slimkit.pruning.allocate import measure as prune_measure

    model = create("resnet20").train()
    x = torch.zeros(1, 3, 32, 32)
    per_module, total = measure.count_macs(model, x)
    assert model.training  # restored
    prof = measure.profile(model, x)
    assert total == prof.macs == prune_measure(model, x)["macs"]
    assert per_module["conv1"] == 16 * 32 * 32 * 27
    assert {lp.name: lp.macs for lp in prof.layers if lp.macs} == {
        n: m for n, m in per_module.items() if m and n in {lp.name for lp in prof.layers}
    }


def test_benchmark_latency_restores_training_mode():
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)).train()
    model[1].eval()  # a submodule's own mode comes back too
    frozen = nn.Linear(8, 8).eval()
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    measure.benchmark_latency(
        {"a": model, "b": frozen}, torch.zeros(1, 8), batch_sizes=(1,), warmup=1, repeats=5, threads=1, max_seconds=1.0
    )
    assert seen and not any(seen)  # timed in eval mode
    assert model.training and not model[1].training and model[0].training and not frozen.training
