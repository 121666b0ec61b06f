"""Knowledge distillation on MNIST-10k, in the spirit of Hinton et al. 2015, and KD as the recovery after pruning.

1. Teacher 784-1200-1200-10 (``mlp_wide``) with dropout and ±2-pixel jitter. Students without regularization:
   784-800-800-10 (``mlp_wide(hidden=800)``) and 784-30-10 (``mlp(hidden=30)``), each trained on the labels and
   distilled at T = 2.5 and T = 4, with the same epochs, optimizer and seed. Target: the distilled student's test
   error at least 10% lower (relative) than on labels.
2. LeNet-5 pruned to 3x fewer MACs (``slimkit.prune``), then fine-tuned for the same epochs on the labels or with
   ``kd_loss_fn(original)``, with SGD (the original's optimizer; this row is the target) and with Adam.
   Target: KD recovers at least as much accuracy.

3. Defaults: the issue-12 setting. A LeNet-5 teacher trained with ``TrainConfig(epochs=10)`` (96.7%), students
   784-32-10 (``mlp(hidden=32)``) and LeNet-300-100 (``lenet300``): ``distill`` with ``DistillConfig()`` as it
   comes vs ``fit`` on the labels with ``slimkit.train``'s own defaults at the same epochs (the baseline). Also the
   labels trained with exactly ``DistillConfig().train`` (the matched arm: what KD itself adds is the gap to it)
   and the previous defaults (T=4, alpha=0.9, lr 1e-3). Target: the defaults beat the baseline on every student.

Means ± std over the seeds of the students / fine-tunes (one teacher, seed 0). No model selection on the test
set: every run keeps its last epoch. Writes benchmarks/results/distill.{json,md}.

    flock /tmp/slimkit-cpu.lock .venv/bin/python benchmarks/distill.py            # ~4 min on 2 cores
    .venv/bin/python benchmarks/distill.py --quick                                # smoke run, ~30 s
    flock /tmp/slimkit-cpu.lock .venv/bin/python benchmarks/distill.py --only defaults   # section 3, ~1 min
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("SLIMKIT_NO_PROGRESS", "1")

import harness  # this folder, first on sys.path when run as a script
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from slimkit import data, models
from slimkit._io import write_text
from slimkit.distillation import DistillConfig, distill, kd_loss_fn
from slimkit.measure import profile
from slimkit.train import TrainConfig, evaluate, fit

RESULTS = Path(__file__).parent / "results"
COMMAND = "flock /tmp/slimkit-cpu.lock .venv/bin/python benchmarks/distill.py"
# /work/shared/REFERENCES.md: Hinton et al. 2015, MNIST (60k train, 10k test), errors out of 10,000
PUBLISHED = {"teacher 1200-1200": 0.67, "student 800-800 on labels": 1.46, "student 800-800 distilled (T=20)": 0.74}
TEMPERATURES = (2.5, 4.0)
ALPHA = 0.9


class Jitter(Dataset):
    """Random shifts of up to ±``pixels`` in x and y, the border filled with the background value."""

    def __init__(self, base, pixels: int = 2, seed: int = 0) -> None:
        self.base, self.pixels = base, pixels
        self.generator = torch.Generator().manual_seed(seed)
        self.background = float(base.images.min())

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        p = self.pixels
        dx, dy = torch.randint(-p, p + 1, (2,), generator=self.generator).tolist()
        padded = F.pad(image, (p, p, p, p), value=self.background)
        return padded[:, p + dy : p + dy + image.shape[1], p + dx : p + dx + image.shape[2]], label


def stats(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "runs": values,
    }


def pm(summary: dict[str, float], digits: int = 2) -> str:
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


def hinton(train, test, seeds: list[int], epochs: dict[str, int]) -> dict:
    started = time.perf_counter()
    torch.manual_seed(0)
    teacher = models.create("mlp_wide", dropout=0.3)
    fit(teacher, Jitter(train), None, TrainConfig(epochs=epochs["teacher"], lr=1e-3, seed=0, restore_best=False))
    teacher_error = 100 - evaluate(teacher, test).accuracy
    print(f"teacher 784-1200-1200-10: {teacher_error:.2f}% error ({time.perf_counter() - started:.0f} s)", flush=True)
    students = {
        "784-800-800-10": ("mlp_wide", {"hidden": 800}, epochs["student"], 1e-3),
        "784-30-10": ("mlp", {"hidden": 30}, epochs["small_student"], 3e-3),
    }
    out = {
        "teacher_error": teacher_error,
        "teacher_params": profile(teacher, torch.zeros(1, 1, 28, 28)).params,
        "students": {},
    }
    for label, (name, kwargs, student_epochs, lr) in students.items():
        runs: dict[str, list[float]] = {"labels": [], **{f"T={t:g}": [] for t in TEMPERATURES}}
        for seed in seeds:
            torch.manual_seed(seed)
            student = models.create(name, **kwargs)
            settings = {"epochs": student_epochs, "lr": lr, "batch_size": 128, "seed": seed, "restore_best": False}
            on_labels = copy.deepcopy(student)
            fit(on_labels, train, None, TrainConfig(**settings))
            runs["labels"].append(100 - evaluate(on_labels, test).accuracy)
            for temperature in TEMPERATURES:
                cfg = DistillConfig(temperature=temperature, alpha=ALPHA, cache_teacher=True, **settings)
                result = distill(student, teacher, cfg, train, None)
                runs[f"T={temperature:g}"].append(100 - evaluate(result.model, test).accuracy)
            print(f"  {label} seed {seed}: " + ", ".join(f"{k} {v[-1]:.2f}%" for k, v in runs.items()), flush=True)
        summary = {k: stats(v) for k, v in runs.items()}
        best = min((k for k in runs if k != "labels"), key=lambda k: summary[k]["mean"])
        reduction = 1 - summary[best]["mean"] / summary["labels"]["mean"]
        out["students"][label] = {
            "errors": summary,
            "best_temperature": best,
            "relative_error_reduction": reduction,
            "target_met": reduction >= 0.10,
            "params": profile(student, torch.zeros(1, 1, 28, 28)).params,
            "epochs": student_epochs,
            "lr": lr,
        }
    out["seconds"] = time.perf_counter() - started
    return out


def pruning_recovery(train, test, seeds: list[int], epochs: dict[str, int]) -> dict:
    started = time.perf_counter()
    try:
        from slimkit.pruning import PruneConfig, prune
    except ImportError as exc:
        return {"available": False, "reason": f"slimkit.pruning is not usable: {exc}"}
    example = torch.zeros(1, 1, 28, 28)
    torch.manual_seed(0)
    original = models.create("lenet5")
    fit(
        original,
        train,
        None,
        TrainConfig(
            epochs=epochs["lenet5"],
            lr=0.05,
            optimizer="sgd",
            weight_decay=5e-4,
            batch_size=64,
            seed=0,
            restore_best=False,
        ),
    )
    pruned = prune(original, PruneConfig(amount=2 / 3, target="macs", importance="l2"), example).model
    macs = (profile(original, example).macs, profile(pruned, example).macs)
    accuracy = {"original": evaluate(original, test).accuracy, "pruned": evaluate(pruned, test).accuracy}
    print(
        f"LeNet-5 {accuracy['original']:.2f}% -> pruned {macs[0] / macs[1]:.2f}x fewer MACs, "
        f"{accuracy['pruned']:.2f}% before fine-tuning",
        flush=True,
    )
    recipes = {
        "SGD 0.01 (the original's optimizer)": {"optimizer": "sgd", "lr": 0.01},
        "Adam 1e-3": {"optimizer": "adam", "lr": 1e-3},
    }
    out = {
        "available": True,
        "macs": {"original": macs[0], "pruned": macs[1], "reduction": macs[0] / macs[1]},
        "accuracy": accuracy,
        "finetune_epochs": epochs["finetune"],
        "recipes": {},
    }
    for recipe, optimizer in recipes.items():
        runs: dict[str, list[float]] = {"labels": [], "kd": []}
        for seed in seeds:
            settings = TrainConfig(epochs=epochs["finetune"], seed=seed, restore_best=False, **optimizer)
            for arm, loss_fn in (("labels", None), ("kd", kd_loss_fn(original, 4.0, alpha=ALPHA))):
                model = copy.deepcopy(pruned)
                fit(model, train, None, settings, loss_fn=loss_fn)
                runs[arm].append(evaluate(model, test).accuracy)
            print(
                f"  fine-tune {recipe} seed {seed}: labels {runs['labels'][-1]:.2f}%, KD {runs['kd'][-1]:.2f}%",
                flush=True,
            )
        summary = {k: stats(v) for k, v in runs.items()}
        out["recipes"][recipe] = {
            "finetuned_accuracy": summary,
            "recovered": {k: summary[k]["mean"] - accuracy["pruned"] for k in runs},
            "kd_at_least_labels": summary["kd"]["mean"] >= summary["labels"]["mean"],
        }
    out["target_met"] = out["recipes"][next(iter(recipes))]["kd_at_least_labels"]
    out["seconds"] = time.perf_counter() - started
    return out


DEFAULT_STUDENTS = {"784-32-10": ("mlp", {"hidden": 32}), "LeNet-300-100": ("lenet300", {})}
LABELS, MATCHED, DEFAULTS, PREVIOUS = (
    "labels (TrainConfig defaults)",
    "labels, distill's training settings",
    "DistillConfig()",
    "previous defaults T=4, alpha=0.9, lr 1e-3",
)


def default_arms(seed: int, quick: bool) -> dict[str, TrainConfig | DistillConfig]:
    """The arms of section 3: a ``TrainConfig`` trains on the labels (``fit``), a ``DistillConfig`` distills.

    ``LABELS`` is ``slimkit.train``'s own defaults at the distiller's epochs (the baseline, not weakened);
    ``MATCHED`` trains on the labels with exactly ``DistillConfig().train`` (learning rate, batch, schedule), so
    the gap ``DEFAULTS - MATCHED`` is what knowledge distillation itself adds and ``MATCHED - LABELS`` what the
    training settings add."""
    quiet = {"progress": False, "restore_best": False, "seed": seed}
    epochs = 1 if quick else DistillConfig().epochs
    return {
        LABELS: TrainConfig(epochs=epochs, **quiet),
        MATCHED: DistillConfig(epochs=epochs, **quiet).train,
        DEFAULTS: DistillConfig(epochs=epochs, **quiet),
        PREVIOUS: DistillConfig(temperature=4.0, alpha=0.9, lr=1e-3, epochs=epochs, **quiet),
    }


def defaults(train, test, seeds: list[int], quick: bool) -> dict:
    started = time.perf_counter()
    torch.manual_seed(0)
    teacher = models.create("lenet5")
    fit(teacher, train, None, TrainConfig(epochs=1 if quick else 10, seed=0, restore_best=False))
    out = {
        "teacher_accuracy": evaluate(teacher, test).accuracy,
        "distill_defaults": {k: v for k, v in DistillConfig().to_dict().items() if k != "train"},
        "train": DistillConfig().train.to_dict(),
        "labels_train": TrainConfig(epochs=DistillConfig().epochs).to_dict(),
        "students": {},
    }
    for label, (name, kwargs) in DEFAULT_STUDENTS.items():
        runs: dict[str, list[float]] = {arm: [] for arm in default_arms(0, quick)}
        for seed in seeds:
            torch.manual_seed(seed)
            student = models.create(name, **kwargs)
            for arm, cfg in default_arms(seed, quick).items():
                if isinstance(cfg, TrainConfig):
                    model = copy.deepcopy(student)
                    fit(model, train, None, cfg)
                else:
                    model = distill(student, teacher, cfg, train, None).model
                runs[arm].append(evaluate(model, test).accuracy)
            print(f"  {label} seed {seed}: " + ", ".join(f"{k} {v[-1]:.2f}%" for k, v in runs.items()), flush=True)
        summary = {k: stats(v) for k, v in runs.items()}
        out["students"][label] = {
            "accuracy": summary,
            "defaults_beat_labels": summary[DEFAULTS]["mean"] > summary[LABELS]["mean"],
            "defaults_beat_labels_every_seed": all(
                d > lab for d, lab in zip(runs[DEFAULTS], runs[LABELS], strict=True)
            ),
            # what KD itself adds: the same training settings on the labels vs distilled
            "kd_gain_matched": summary[DEFAULTS]["mean"] - summary[MATCHED]["mean"],
            "kd_beats_matched_every_seed": all(d > lab for d, lab in zip(runs[DEFAULTS], runs[MATCHED], strict=True)),
            "training_settings_gain": summary[MATCHED]["mean"] - summary[LABELS]["mean"],
        }
    out["seconds"] = time.perf_counter() - started
    return out


def defaults_markdown(d: dict) -> list[str]:
    t, lt, dd = d["train"], d["labels_train"], d["distill_defaults"]
    arms = list(next(iter(d["students"].values()))["accuracy"])
    lines = [
        "## Defaults: `distill(student, teacher, DistillConfig())` vs labels at equal epochs, test accuracy %",
        "",
        f"Teacher LeNet-5 trained with `TrainConfig(epochs=10)`: {d['teacher_accuracy']:.2f}%. Labels baseline: "
        f"`fit` with `TrainConfig(epochs={lt['epochs']})` ({lt['optimizer']} lr {lt['lr']:g}, batch "
        f"{lt['batch_size']}, {lt['schedule']}). `DistillConfig()`: temperature {dd['temperature']:g}, alpha "
        f"{dd['alpha']:g}, {t['epochs']} epochs, {t['optimizer']} lr {t['lr']:g}, batch {t['batch_size']}, "
        f"{t['schedule']}. Matched: the labels trained with exactly `DistillConfig().train`. Last epoch kept.",
        "",
        "| student | " + " | ".join(arms) + " | defaults > labels (mean / every seed) "
        "| KD itself: defaults - matched labels | training settings: matched - baseline labels |",
        "|---|" + "---|" * len(arms) + "---|---|---|",
    ]
    for label, row in d["students"].items():
        acc = row["accuracy"]
        cells = [f"{pm(acc[arm])} ({', '.join(f'{v:.2f}' for v in acc[arm]['runs'])})" for arm in arms]
        mean, every = row["defaults_beat_labels"], row["defaults_beat_labels_every_seed"]
        verdict = f"{'yes' if mean else 'no'} / {'yes' if every else 'no'}"
        every_kd = "every seed" if row["kd_beats_matched_every_seed"] else "not every seed"
        kd = f"{row['kd_gain_matched']:+.2f} ({every_kd})"
        lines.append(
            f"| {label} | " + " | ".join(cells) + f" | {verdict} | {kd} | {row['training_settings_gain']:+.2f} |"
        )
    lines.append("")
    for label, row in d["students"].items():
        acc = row["accuracy"]
        spread = max(acc[DEFAULTS]["std"], acc[MATCHED]["std"])
        source = (
            "within the seed spread of the matched labels: the gain over the baseline is the training settings, "
            "not distillation"
            if abs(row["kd_gain_matched"]) <= spread
            else "more than the seed spread: distillation itself adds to the training settings"
            if row["kd_gain_matched"] > 0
            else "distillation itself costs accuracy at these settings"
        )
        lines.append(f"- {label}: KD itself {row['kd_gain_matched']:+.2f} points ({source}).")
    seconds = f" ({d['seconds']:.0f} s)" if "seconds" in d else ""
    lines.append(f"\nSection rerun alone: `{COMMAND} --only defaults`{seconds}.")
    return [*lines, ""]


def markdown(result: dict) -> str:
    settings = result["settings"]
    head = [
        "# Distillation benchmark (MNIST-10k: 8,000 train / 2,000 test digits)",
        "",
        f"Command: `{result['command']}`; {result['threads']} threads, {result['machine']}. Mean ± std over seeds "
        f"{settings['seeds']} (one teacher, seed 0); every run keeps its last epoch (no selection on the test set).",
        "",
    ]
    if "hinton" not in result:
        return "\n".join(head + defaults_markdown(result["defaults"]))
    h = result["hinton"]
    lines = [
        "# Distillation benchmark (MNIST-10k: 8,000 train / 2,000 test digits)",
        "",
        f"Command: `{result['command']}`; {result['threads']} threads, {result['machine']}, "
        f"{result['seconds']:.0f} s in all. Mean ± std over seeds {settings['seeds']} (one teacher, seed 0); "
        "every run keeps its last epoch (no selection on the test set).",
        "",
        f"## Hinton et al. 2015 setting: test error % (teacher {h['teacher_error']:.2f}%)",
        "",
        f"Teacher 784-1200-1200-10, dropout 0.3, ±2-pixel jitter, {settings['epochs']['teacher']} epochs. Students "
        f"unregularized, Adam: 800-800 {settings['epochs']['student']} epochs at lr 1e-3, 30 hidden units "
        f"{settings['epochs']['small_student']} epochs at lr 3e-3 (the same for both arms); alpha = {ALPHA}.",
        "",
        "| student | params | on labels | "
        + " | ".join(f"distilled T={t:g}" for t in TEMPERATURES)
        + " | relative error reduction (best T) | target ≥ 10% |",
        "|---|---|---|" + "---|" * len(TEMPERATURES) + "---|---|",
    ]
    for label, s in h["students"].items():
        errors = s["errors"]
        lines.append(
            f"| {label} | {s['params']:,} | {pm(errors['labels'])} | "
            + " | ".join(pm(errors[f"T={t:g}"]) for t in TEMPERATURES)
            + f" | {s['relative_error_reduction']:.1%} ({s['best_temperature']}) | "
            f"{'met' if s['target_met'] else 'NOT met'} |"
        )
    published = PUBLISHED
    lines += [
        "",
        "Published (Hinton et al. 2015, full MNIST 60k/10k, T = 20): teacher "
        f"{published['teacher 1200-1200']:.2f}%, student 800-800 on labels "
        f"{published['student 800-800 on labels']:.2f}% -> distilled "
        f"{published['student 800-800 distilled (T=20)']:.2f}% (a "
        f"{1 - published['student 800-800 distilled (T=20)'] / published['student 800-800 on labels']:.0%} "
        "relative error reduction). Expect the same trend, not the same digits: 8,000 training images here.",
        "",
    ]
    r = result["pruning_recovery"]
    lines.append("## Recovery after pruning: LeNet-5, 3x fewer MACs, test accuracy %")
    lines.append("")
    if not r["available"]:
        lines.append(f"Not run: {r['reason']}")
    else:
        lines += [
            f"L2 structured pruning to {r['macs']['reduction']:.2f}x fewer MACs ({r['macs']['original']:,} -> "
            f"{r['macs']['pruned']:,}), then {r['finetune_epochs']} epochs of fine-tuning on the labels or with "
            f"`kd_loss_fn(original, 4.0, alpha={ALPHA})`. Original {r['accuracy']['original']:.2f}%, pruned "
            f"{r['accuracy']['pruned']:.2f}% before fine-tuning.",
            "",
            "| fine-tuning | on labels | with KD | recovered: labels / KD (points) | KD ≥ labels |",
            "|---|---|---|---|---|",
        ]
        for recipe, row in r["recipes"].items():
            ft, rec = row["finetuned_accuracy"], row["recovered"]
            lines.append(
                f"| {recipe} | {pm(ft['labels'])} | {pm(ft['kd'])} | {rec['labels']:.2f} / {rec['kd']:.2f} "
                f"| {'yes' if row['kd_at_least_labels'] else 'no'} |"
            )
    if "defaults" in result:
        lines += ["", *defaults_markdown(result["defaults"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny epochs: checks the script runs, not the claims")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--only", choices=["all", "defaults"], default="all", help="defaults: run section 3 only, merged into the JSON"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    epochs = (
        {"teacher": 1, "student": 1, "small_student": 1, "lenet5": 1, "finetune": 1}
        if args.quick
        else {"teacher": 40, "student": 20, "small_student": 60, "lenet5": 20, "finetune": 3}
    )
    seeds = list(range(args.seeds))
    train, test = data.load("mnist10k")
    started = time.perf_counter()
    command = COMMAND + (
        (" --quick" if args.quick else "")
        + (f" --seeds {args.seeds}" if args.seeds != 3 else "")
        + (f" --only {args.only}" if args.only != "all" else "")
    )
    result = {
        "command": command,
        "threads": torch.get_num_threads(),
        "machine": harness.machine(),
        "settings": {"seeds": seeds, "epochs": epochs, "alpha": ALPHA, "temperatures": TEMPERATURES},
        "published": PUBLISHED,
    }
    name = "distill-quick" if args.quick else "distill"
    previous = args.out / f"{name}.json"
    if args.only == "defaults" and previous.exists():  # keep the other sections of the last full run
        result = {**json.loads(previous.read_text()), "defaults_command": command}
    if args.only == "all":
        result["hinton"] = hinton(train, test, seeds, epochs)
        result["pruning_recovery"] = pruning_recovery(train, test, seeds, epochs)
    result["defaults"] = defaults(train, test, seeds, args.quick)
    if args.only == "all":
        result["seconds"] = time.perf_counter() - started
    write_text(args.out / f"{name}.json", json.dumps(result, indent=2) + "\n")
    write_text(args.out / f"{name}.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
