"""Automatic search with Optuna on MNIST-10k, timed end to end on this machine.

Part 1 (compression plans): LeNet-5 trained on 7,000 MNIST-10k digits (SGD, 8 epochs). ``slimkit.search`` with the
``compression`` preset (pruning amount / criterion / allocation, bit width of ``features`` and ``classifier``
from {32, 8, 4, ternary, binary}, distillation on/off; 3 recovery epochs per trial), objectives accuracy + bytes on
disk, budget ``max_accuracy_drop=0.5`` on 1,000 held-out training digits. The best plan is reloaded from disk and
checked on the 2,000 test digits: size ratio of the saved artifacts, latency side by side at batch 64 (2 threads,
median), accuracy drop. Goal: >= 3x faster at batch 64 or >= 8x smaller on disk, losing <= 0.5 points.

Part 2 (hyperparameters): the seed MLP with ``TrainConfig()`` defaults for 3 epochs, against ``slimkit.search``
with the ``training`` preset (lr, weight decay, batch size, optimizer; 3 epochs, TPE + median pruner), selected on
the held-out digits, both scored on the test digits.

Run: ``flock /tmp/slimkit-cpu.lock .venv/bin/python benchmarks/search.py`` (writes benchmarks/results/search.{json,md}
and search-pareto.png; the studies live in .slimkit-cache/bench-search/, deleted first unless --resume).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch

import slimkit
from slimkit.data import ArrayDataset
from slimkit.measure import compare_latency
from slimkit.train import TrainConfig, evaluate, fit
from slimkit.tuning import SearchConfig, load_model, search

OUT = Path(__file__).parent / "results"
WORK = Path(".slimkit-cache/bench-search")
EPOCHS = 3


def split(train: ArrayDataset) -> tuple[ArrayDataset, ArrayDataset]:
    return (
        ArrayDataset(train.images[:7000], train.labels[:7000], "mnist10k/train[:7000]"),
        ArrayDataset(train.images[7000:], train.labels[7000:], "mnist10k/train[7000:]"),
    )


def artifact_bytes(folder: Path) -> int:
    return (folder / "model.safetensors").stat().st_size


def compression(train, val, test, n_trials: int) -> dict:
    torch.manual_seed(0)
    model = slimkit.models.create("lenet5")
    fit(
        model,
        train,
        val,
        TrainConfig(epochs=8, lr=0.05, optimizer="sgd", weight_decay=5e-4, batch_size=64, progress=False),
    )
    cfg = SearchConfig(
        objectives=("accuracy", "size"),
        max_accuracy_drop=0.5,
        n_trials=n_trials,
        space="compression",
        epochs=EPOCHS,
        out=str(WORK / "lenet5"),
        seed=0,
    )
    start = time.perf_counter()
    study = search(model, cfg, train, val)
    seconds = time.perf_counter() - start
    print(study)
    best = study.best
    small = load_model(best.path)  # what is on disk, not what is in memory
    slimkit.save(model, WORK / "lenet5-input")
    x = torch.zeros(1, 1, 28, 28)
    lat = compare_latency(model, small, x, batch_sizes=(1, 64), threads=2, repeats=50)
    base_acc, best_acc = evaluate(model, test).accuracy, evaluate(small, test).accuracy
    size_ratio = artifact_bytes(WORK / "lenet5-input") / artifact_bytes(best.path / "model")
    return {
        "seconds": seconds,
        "trials": study.finished + study.pruned,
        "finished": study.finished,
        "best_trial": best.trial,
        "plan": best.plan,
        "feasible": best.feasible,
        "val_accuracy": {"input": study.baseline["accuracy"], "best": best.metrics["accuracy"]},
        "test_accuracy": {"input": base_acc, "best": best_acc},
        "test_drop": base_acc - best_acc,
        "bytes": {"input": artifact_bytes(WORK / "lenet5-input"), "best": artifact_bytes(best.path / "model")},
        "size_ratio": size_ratio,
        "latency_ms_b64": {"input": lat.a[64].median * 1e3, "best": lat.b[64].median * 1e3},
        "speedup": {str(k): v for k, v in lat.speedup.items()},
        "pareto": [
            {"trial": r.trial, "val_accuracy": r.metrics["accuracy"], "bytes": r.metrics["size_bytes"], "plan": r.plan}
            for r in study.pareto
        ],
        "importances": study.importances.get("size", {}),
        "message": study.message,
        "goal_met": (size_ratio >= 8 or lat.speedup[64] >= 3) and base_acc - best_acc <= 0.5,
    }


def hpo(train, val, test, n_trials: int) -> dict:
    torch.manual_seed(0)
    init = slimkit.models.create("mlp")
    default = slimkit.models.create("mlp")
    default.load_state_dict(init.state_dict())
    fit(default, train, val, TrainConfig(epochs=EPOCHS, progress=False))
    cfg = SearchConfig(
        objectives=("accuracy",), n_trials=n_trials, space="training", epochs=EPOCHS, out=str(WORK / "mlp"), seed=0
    )
    start = time.perf_counter()
    study = search(init, cfg, train, val)
    seconds = time.perf_counter() - start
    print(study)
    tuned = load_model(study.best.path)
    d, t = evaluate(default, test).accuracy, evaluate(tuned, test).accuracy
    return {
        "seconds": seconds,
        "trials": study.finished + study.pruned,
        "pruned": study.pruned,
        "default": {
            "val_accuracy": evaluate(default, val).accuracy,
            "test_accuracy": d,
            "settings": TrainConfig(epochs=EPOCHS).to_dict(),
        },
        "tuned": {"val_accuracy": study.best.metrics["accuracy"], "test_accuracy": t, "settings": study.best.plan},
        "importances": study.importances.get("accuracy", {}),
        "goal_met": t > d,
    }


def markdown(res: dict) -> str:
    c, h = res["compression"], res["hpo"]
    lines = [
        "# Search benchmark (MNIST-10k, 2 threads)",
        "",
        f"Command: `{res['command']}`; torch {res['torch']}; whole script (data, training the inputs, both searches, "
        f"checks) {res['total_seconds']:.0f} s.",
        "",
        f"## LeNet-5 compression plans ({c['trials']} trials in {c['seconds']:.0f} s, budget 0.5 points)",
        "",
        "| model | test accuracy (%) | bytes on disk | latency batch 64 (ms) |",
        "|---|---|---|---|",
        f"| input | {c['test_accuracy']['input']:.2f} | {c['bytes']['input']:,} | {c['latency_ms_b64']['input']:.3f} |",
        f"| best plan (trial {c['best_trial']}) | {c['test_accuracy']['best']:.2f} | {c['bytes']['best']:,} | "
        f"{c['latency_ms_b64']['best']:.3f} |",
        "",
        f"Size ratio **{c['size_ratio']:.1f}x**, speed-up at batch 64 {c['speedup']['64']:.2f}x, test accuracy drop "
        f"{c['test_drop']:.2f} points; goal met: {c['goal_met']}.",
        "",
        f"Best plan: `{json.dumps(c['plan'])}`",
        "",
        "Pareto set (validation accuracy vs bytes):",
        "",
        "| trial | val accuracy | bytes | plan |",
        "|---|---|---|---|",
        *[
            f"| {p['trial']} | {p['val_accuracy']:.2f} | {p['bytes']:,.0f} | `{json.dumps(p['plan'])}` |"
            for p in c["pareto"]
        ],
        "",
        f"## MLP hyperparameters ({h['trials']} trials, {h['pruned']} pruned, in {h['seconds']:.0f} s, "
        f"{EPOCHS} epochs each)",
        "",
        "| settings | val accuracy (%) | test accuracy (%) |",
        "|---|---|---|",
        f"| TrainConfig() defaults | {h['default']['val_accuracy']:.2f} | {h['default']['test_accuracy']:.2f} |",
        f"| searched `{json.dumps(h['tuned']['settings'])}` | {h['tuned']['val_accuracy']:.2f} | "
        f"{h['tuned']['test_accuracy']:.2f} |",
        "",
        f"Goal met (tuned beats defaults on test): {h['goal_met']}.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    start = time.perf_counter()
    torch.set_num_threads(2)
    if "--resume" not in sys.argv:
        shutil.rmtree(WORK, ignore_errors=True)
    full_train, test = slimkit.data.load("mnist10k")
    train, val = split(full_train)
    res = {
        "command": "flock /tmp/slimkit-cpu.lock .venv/bin/python benchmarks/search.py",
        "torch": torch.__version__,
        "compression": compression(train, val, test, n_trials=60),
        "hpo": hpo(train, val, test, n_trials=40),
    }
    res["total_seconds"] = time.perf_counter() - start
    OUT.mkdir(exist_ok=True)
    (OUT / "search.json").write_text(json.dumps(res, indent=1) + "\n")
    (OUT / "search.md").write_text(markdown(res))
    shutil.copyfile(WORK / "lenet5" / "pareto.png", OUT / "search-pareto.png")
    print(markdown(res))
    return 0 if res["compression"]["goal_met"] and res["hpo"]["goal_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
