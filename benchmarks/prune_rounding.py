"""Does rounding pruned widths to multiples of 16 cost accuracy? (issue 11, "Done when": within 0.5 points of
``round_to=1`` at equal MACs.)

ResNet-56 (10 classes) is trained on the bundled MNIST-10k presented as 32x32x3 (bilinear resize, the channel
repeated: ``slimkit.data.load(shape=(3, 32, 32))``), with 1,000 of the 8,000 training images held out for
validation (``slimkit.data.split``). The trained model is pruned to 50% of its MACs twice, identical but for
``round_to`` (1: any width; 16: multiples of 16, ONNX Runtime's NCHWc block), L2 importance and uniform allocation
both, and each pruned model is fine-tuned with the same ``TrainConfig`` for each seed. Reported: test accuracy
(2,000 images never used for training or selection) before and after fine-tuning, MACs reduction, the kept
widths, and the difference of the mean accuracies.

Run (about 8 minutes on 2 cores): ``flock /tmp/slimkit-cpu.lock .venv/bin/python benchmarks/prune_rounding.py``
(``--epochs 6 --finetune-epochs 4 --seeds 0 1``); writes benchmarks/results/prune_rounding.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

import slimkit
from slimkit.data import load, split
from slimkit.train import TrainConfig, evaluate, fit, predict

OUT = Path(__file__).parent / "results"
AMOUNT = 0.5
CRITERION = 0.5  # points


def widths(model: torch.nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6, help="training epochs of the unpruned model")
    parser.add_argument("--finetune-epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="fine-tuning seeds")
    parser.add_argument("--max-batches", type=int, default=None, help="batches per epoch (smoke runs only)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()

    train, test = load("mnist10k", shape=(3, 32, 32))
    train, val = split(train, 0.125)
    x = torch.zeros(1, 3, 32, 32)
    torch.manual_seed(0)
    model = slimkit.models.create("resnet56", num_classes=10)
    fit(
        model,
        train,
        val,
        TrainConfig(epochs=args.epochs, lr=1e-3, seed=0, max_batches=args.max_batches, progress=False),
    )
    base_acc = evaluate(model, test).accuracy
    base_macs = slimkit.profile(model, x).macs
    print(f"unpruned: {base_acc:.2f}% after {args.epochs} epochs, {time.perf_counter() - start:.0f} s", flush=True)

    finetune = {"epochs": args.finetune_epochs, "lr": 5e-4, "max_batches": args.max_batches, "progress": False}
    variants = []
    predictions: dict[tuple[int, int], torch.Tensor] = {}
    for round_to in (1, 16):
        cfg = slimkit.PruneConfig(
            amount=AMOUNT, target="macs", importance="l2", allocation="uniform", round_to=round_to
        )
        pruned = slimkit.prune(model, cfg, x).model
        macs = slimkit.profile(pruned, x).macs
        row = {
            "round_to": round_to,
            "macs": macs,
            "macs_reduction": 1 - macs / base_macs,
            "conv_widths": sorted(set(widths(pruned))),
            "accuracy_pruned": evaluate(pruned, test).accuracy,
            "accuracy_finetuned": {},
            "test_loss_finetuned": {},
            "val_accuracy_finetuned": {},
        }
        for seed in args.seeds:
            tuned = copy.deepcopy(pruned)
            history = fit(tuned, train, val, TrainConfig(seed=seed, **finetune))
            logits, targets = predict(tuned, test)
            predictions[round_to, seed] = logits.argmax(1)
            row["accuracy_finetuned"][str(seed)] = accuracy = 100.0 * float(
                (logits.argmax(1) == targets).float().mean()
            )
            row["test_loss_finetuned"][str(seed)] = float(torch.nn.functional.cross_entropy(logits, targets))
            row["val_accuracy_finetuned"][str(seed)] = history.best_accuracy
            print(f"round_to={round_to} seed {seed}: {accuracy:.2f}% ({time.perf_counter() - start:.0f} s)", flush=True)
        row["mean_accuracy"] = statistics.fmean(row["accuracy_finetuned"].values())
        variants.append(row)

    one, sixteen = variants
    difference = sixteen["mean_accuracy"] - one["mean_accuracy"]
    # test images on which the two fine-tuned models (same seed) predict different classes: equal accuracies of
    # different models are a coincidence of counts, not one model measured twice
    disagreement = {str(s): int((predictions[1, s] != predictions[16, s]).sum()) for s in args.seeds}
    result = {
        "model": "resnet56 (10 classes), MNIST-10k as 32x32x3: 7,000 train / 1,000 val / 2,000 test",
        "train": {"epochs": args.epochs, "lr": 1e-3, "optimizer": "adam", "schedule": "cosine"},
        "finetune": {**finetune, "optimizer": "adam", "schedule": "cosine", "seeds": args.seeds},
        "prune": {"amount": AMOUNT, "target": "macs", "importance": "l2", "allocation": "uniform"},
        "unpruned_accuracy": base_acc,
        "unpruned_macs": base_macs,
        "variants": variants,
        "difference_points": difference,
        "test_images_predicted_differently": disagreement,
        "criterion": f"round_to=16 within {CRITERION} points of round_to=1",
        "met": difference >= -CRITERION,
        "seconds": time.perf_counter() - start,
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "prune_rounding.json").write_text(json.dumps(result, indent=2) + "\n")
    (OUT / "prune_rounding.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    seeds = r["finetune"]["seeds"]
    lines = [
        "# Pruning with widths rounded to 16 vs any width, at equal MACs (ResNet-56, MNIST as 32x32x3)",
        "",
        f"{r['model']}. Unpruned: {r['unpruned_accuracy']:.2f}% test accuracy after {r['train']['epochs']} epochs "
        f"(Adam, lr {r['train']['lr']}, cosine). Both pruned to {r['prune']['amount']:.0%} of the MACs "
        f"({r['prune']['importance']}, {r['prune']['allocation']}), then fine-tuned {r['finetune']['epochs']} epochs "
        f"(Adam, lr {r['finetune']['lr']}, cosine, best validation epoch kept) with seeds {seeds}.",
        "",
        "| round_to | MACs reduction | conv widths | test acc. pruned | "
        + " | ".join(f"fine-tuned seed {s}" for s in seeds)
        + " | mean |",
        "|---|---|---|---|" + "---|" * len(seeds) + "---|",
    ]
    for v in r["variants"]:
        accs = " | ".join(f"{v['accuracy_finetuned'][str(s)]:.2f}" for s in seeds)
        lines.append(
            f"| {v['round_to']} | {v['macs_reduction']:.1%} | {', '.join(map(str, v['conv_widths']))} | "
            f"{v['accuracy_pruned']:.2f} | {accs} | {v['mean_accuracy']:.2f} |"
        )
    verdict = "met" if r["met"] else "NOT met"
    differ = ", ".join(f"seed {s}: {n}" for s, n in r["test_images_predicted_differently"].items())
    losses = "; ".join(
        f"round_to={v['round_to']}: " + ", ".join(f"{x:.4f}" for x in v["test_loss_finetuned"].values())
        for v in r["variants"]
    )
    lines += [
        "",
        f"Test images the two fine-tuned models classify differently ({differ}); test loss ({losses}).",
        "",
        f"round_to=16 minus round_to=1: **{r['difference_points']:+.2f} points** (mean over seeds); "
        f"{r['criterion']}: {verdict}. Whole run {r['seconds'] / 60:.1f} min on 2 threads.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
