"""Atomic saves (slimkit._io): one-step replacement, no leftovers after kills and signals, concurrent writers,
nothing destroyed that is not slimkit's, every CLI ``--out`` checked before any work."""

import errno
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import slimkit
from slimkit import _io
from slimkit._io import atomic_path, check_replaceable, kind_of, write_text
from slimkit.cli import app
from slimkit.errors import UsageError
from slimkit.models import save_weights
from slimkit.tuning.saving import copy_result, save_result

runner = CliRunner()
MLP64 = ["--model", "mlp", "--model-args", json.dumps({"in_features": 64, "hidden": 16})]


def _leftovers(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def _user_folder(path: Path) -> dict[str, bytes]:
    path.mkdir()
    files = {"notes.txt": b"my notes\n", "data.csv": b"a,b\n1,2\n"}
    for name, data in files.items():
        (path / name).write_bytes(data)
    return files


def _contents(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in path.iterdir()}


# --- one atomic step, the fallback, the kinds -------------------------------------------------------------------


def test_a_folder_is_replaced_by_one_exchange(tmp_path, monkeypatch):
    calls = []
    exchange = _io._exchange
    monkeypatch.setattr(_io, "_exchange", lambda a, b: calls.append(b) or exchange(a, b))
    model = slimkit.models.create("mlp")
    target = slimkit.save(model, tmp_path / "m.slim")
    assert calls == []  # nothing to replace: a plain rename
    torch.nn.init.zeros_(model[1].weight)
    slimkit.save(model, target)
    assert calls == [target]
    assert torch.equal(slimkit.load(target)[1].weight, model[1].weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.slim"]


def test_without_renameat2_two_renames_still_replace(tmp_path, monkeypatch):
    monkeypatch.setattr(_io, "_renameat2", lambda: None)
    for text in ("old", "new"):
        with atomic_path(tmp_path / "out", kind="prune") as tmp:
            tmp.mkdir()
            (tmp / "record.json").write_text(text)
    assert (tmp_path / "out" / "record.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_write_keeps_the_old_and_leaves_nothing(tmp_path):
    target = write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old" and _leftovers(target) == []


def test_kind_of_and_check_replaceable(tmp_path):
    assert kind_of(tmp_path / "nothing") is None
    (tmp_path / "empty").mkdir()
    assert kind_of(tmp_path / "empty") == "empty"
    _user_folder(tmp_path / "mine")
    assert kind_of(tmp_path / "mine") == "folder"
    artifact = slimkit.save(slimkit.models.create("mlp"), tmp_path / "a.slim")
    assert kind_of(artifact) == "artifact"
    check_replaceable(artifact, "artifact")
    check_replaceable(tmp_path / "empty", "artifact")
    for path, kind in [
        (tmp_path / "mine", "artifact"),
        (artifact, "result"),
        (artifact, "file"),
        (tmp_path / "empty", "file"),
        (artifact / "slimkit.json", "artifact"),
    ]:
        with pytest.raises(UsageError, match=str(path)):
            check_replaceable(path, kind)


def test_savers_never_replace_a_folder_that_is_not_theirs(tmp_path):
    model = slimkit.models.create("mlp")
    results = tmp_path / "results"
    files = _user_folder(results)
    artifact = slimkit.save(model, tmp_path / "a.slim")
    before = _contents(artifact)
    attempts = [
        lambda: save_weights(model, results),
        lambda: slimkit.save(model, results),
        lambda: save_result(model, results, {}),
        lambda: copy_result(artifact, results),
        lambda: write_text(results, "x"),
        lambda: save_weights(model, artifact),
        lambda: save_result(model, artifact, {}),
    ]
    for attempt in attempts:
        with pytest.raises(UsageError, match="refusing to replace|is a folder"):
            attempt()
    assert _contents(results) == files and _contents(artifact) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.slim", "results"]
    (tmp_path / "w").write_text("a file")
    with pytest.raises(UsageError, match="is a file"):
        slimkit.save(model, tmp_path / "w")
    (tmp_path / "empty").mkdir()
    assert kind_of(slimkit.save(model, tmp_path / "empty")) == "artifact"  # nothing lost: an empty folder


def test_stale_temporaries_are_removed_but_live_ones_kept(tmp_path):
    import fcntl

    target = slimkit.save(slimkit.models.create("mlp"), tmp_path / "m.slim")
    dead = tmp_path / ".m.slim.dead0000.tmp"
    (dead / "m.slim").mkdir(parents=True)
    (dead / "m.slim" / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / ".m.slim.file0000.tmp").write_text("a temporary file of an older slimkit")
    live = tmp_path / ".m.slim.live0000.tmp"
    live.mkdir()
    other = tmp_path / ".m.slim.v2.abcd1234.tmp"  # another target's (m.slim.v2) temporary: not ours to judge
    other.mkdir()
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a writer that is still alive
        slimkit.save(slimkit.models.create("mlp"), target)
        assert _leftovers(target) == [".m.slim.live0000.tmp", ".m.slim.v2.abcd1234.tmp"]
    finally:
        os.close(fd)
    slimkit.save(slimkit.models.create("mlp"), target)
    assert _leftovers(target) == [".m.slim.v2.abcd1234.tmp"]


# --- kills, signals, concurrent writers: a child python forks savers ----------------------------------------------

SAVERS = r"""
import json, os, random, signal, sys, time, traceback
from pathlib import Path
import torch
torch.set_num_threads(1)  # no thread pool: forking below is safe
import slimkit
from slimkit.cli import exit_cleanly_on_sigterm

mode, target, rounds = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
rng = random.Random(int(sys.argv[4]))
torch.manual_seed(0)
models = [slimkit.models.create("mlp"), slimkit.models.create("mlp")]
slimkit.save(models[0], target)
report = {"failures": [], "leftovers_seen": 0, "exit_codes": []}


def leftovers():
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith("." + target.name + "."))


def check(when):
    try:
        slimkit.load(target)
    except Exception as exc:
        report["failures"].append(f"{when}: {type(exc).__name__}: {exc}")


def saver(model, times=None, on_sigterm=False):
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        if on_sigterm:
            exit_cleanly_on_sigterm()
        done = 0
        while times is None or done < times:
            slimkit.save(model, target)
            done += 1
    except (KeyboardInterrupt, SystemExit):
        pass
    except BaseException:
        traceback.print_exc()
        code = 1
    os._exit(code)


for i in range(rounds):
    if mode == "concurrent":
        pids = [saver(models[0], times=12), saver(models[1], times=12)]
        report["exit_codes"] += [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
        check(f"round {i}")
        left = leftovers()
        if left:
            report["failures"].append(f"round {i}: leftovers {left}")
        continue
    sig = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}[mode]
    pid = saver(models[i % 2], on_sigterm=True)
    time.sleep(rng.uniform(0.02, 0.12))
    os.kill(pid, sig)
    report["exit_codes"].append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    check(f"after kill {i}")
    left = leftovers()
    report["leftovers_seen"] += bool(left)
    if left and mode != "kill":  # a signal must clean up by itself, without a later save
        report["failures"].append(f"round {i}: {mode} left {left}")
print(json.dumps(report))
"""


def _run_savers(mode: str, target: Path, rounds: int, seed: int = 0) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", SAVERS, mode, str(target), str(rounds), str(seed)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _sigkill_loop(tmp_path: Path, rounds: int) -> None:
    target = tmp_path / "m.slim"
    report = _run_savers("kill", target, rounds)
    assert report["exit_codes"] == [-9] * rounds
    assert report["failures"] == []  # after every kill: a complete artifact (old or new), never nothing
    assert report["leftovers_seen"] > 0  # kills did land inside saves
    slimkit.save(slimkit.models.create("mlp"), target)  # the next save removes what the killed ones left
    assert _leftovers(target) == []
    slimkit.load(target)


def test_sigkill_during_saves_leaves_old_or_new_and_the_next_save_cleans_up(tmp_path):
    _sigkill_loop(tmp_path, 20)


@pytest.mark.slow
def test_sigkill_during_saves_200_times(tmp_path):
    _sigkill_loop(tmp_path, 200)


@pytest.mark.parametrize("mode,exit_code", [("term", 0), ("int", 0)])
def test_sigterm_and_sigint_during_a_save_leave_no_temporaries(tmp_path, mode, exit_code):
    report = _run_savers(mode, tmp_path / "m.slim", 12, seed=1)
    assert report["exit_codes"] == [exit_code] * 12  # the child caught the signal as an exception and ended
    assert report["failures"] == []


def test_two_writers_to_one_path_both_succeed(tmp_path):
    target = tmp_path / "m.slim"
    report = _run_savers("concurrent", target, 3)
    assert report["exit_codes"] == [0] * 6 and report["failures"] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.slim"]


# --- the CLI: --out checked first, full disk, compress leaves no temp folder ------------------------------------


def _no_work(monkeypatch, module):
    def started(*args, **kwargs):
        raise AssertionError("work started before --out was checked")

    for name in ("build_model", "load_data"):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, started)


@pytest.mark.parametrize(
    "command,module,extra,out_kind",
    [
        ("train", "core", [*MLP64, "--data", "digits", "--epochs", "1"], "user"),
        ("train", "core", [*MLP64, "--data", "digits"], "artifact"),
        ("distill", "distill", ["--student", "mlp", "--teacher", "mlp", "--teacher-weights", "t.safetensors"], "user"),
        ("quantize", "quantize", [*MLP64, "--data", "digits"], "user"),
        ("quantize", "quantize", [*MLP64, "--data", "digits"], "file"),
        ("prune", "prune", MLP64, "user"),
        ("prune", "prune", MLP64, "artifact"),
        ("compress", "pipeline", [*MLP64, "--data", "digits"], "file"),
        ("compress", "pipeline", [*MLP64, "--data", "digits"], "user-slim"),
        ("search", "search", [*MLP64, "--data", "digits"], "user"),
        ("search", "search", [*MLP64, "--data", "digits"], "file"),
        ("train", "core", [*MLP64, "--data", "digits"], "under-a-file"),
    ],
)
def test_cli_refuses_a_bad_out_before_any_work(tmp_path, monkeypatch, command, module, extra, out_kind):
    import importlib

    _no_work(monkeypatch, importlib.import_module(f"slimkit.commands.{module}"))
    out = tmp_path / "results"
    if out_kind == "user":
        files = _user_folder(out)
    elif out_kind == "artifact":
        slimkit.save(slimkit.models.create("mlp"), out)
        files = _contents(out)
    elif out_kind == "user-slim":
        out.mkdir()
        files = _user_folder(out / "mlp.slim")
    else:
        out.write_text("a file")
        files = {"results": b"a file"}
    if out_kind == "under-a-file":
        out = out / "w.safetensors"
    result = runner.invoke(app, [command, *extra, "--out", str(out)])
    assert result.exit_code == 2, result.output
    line = " ".join(result.output.split())
    assert line.startswith("error: --out") and str(tmp_path / "results") in line, line
    assert len(result.output.strip().splitlines()) <= 3  # one line (rich may wrap a long one)
    if out_kind == "user-slim":
        now = _contents(tmp_path / "results" / "mlp.slim")
    elif (tmp_path / "results").is_dir():
        now = _contents(tmp_path / "results")
    else:
        now = {"results": (tmp_path / "results").read_bytes()}
    assert now == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_cli_refuses_an_unwritable_parent(tmp_path, monkeypatch):
    import slimkit.commands.core as core

    _no_work(monkeypatch, core)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() == 0:  # root may write anywhere: let access() say what it would say to anyone else
        access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: access(path, mode) and Path(path) != locked)
    try:
        result = runner.invoke(app, ["train", *MLP64, "--data", "digits", "--out", str(locked / "w.safetensors")])
    finally:
        locked.chmod(0o700)
    assert result.exit_code == 2, result.output
    assert "not writable" in result.output and list(locked.iterdir()) == []


def test_cli_full_disk_is_one_line_and_the_old_weights_stay(tmp_path, monkeypatch):
    import slimkit.models.weights as weights_module

    out = tmp_path / "w.safetensors"
    result = runner.invoke(app, ["train", *MLP64, "--data", "digits", "--epochs", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    before = out.read_bytes()

    def full(state, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\0" * 100)  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(weights_module, "save_file", full)
    result = runner.invoke(app, ["train", *MLP64, "--data", "digits", "--epochs", "1", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "the disk is full" in result.output and "Traceback" not in result.output
    assert out.read_bytes() == before and _leftovers(out) == []


def test_compress_leaves_nothing_in_the_temp_folder(tmp_path, monkeypatch):
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: t\nmax_accuracy_drop: 100\nrecovery_epochs: 0\nsteps:\n"
        "  - quantize: {method: ptq, weight_bits: 8, act_bits: 8}\n  - export: {format: onnx}\n"
    )
    result = runner.invoke(
        app, ["compress", *MLP64, "--data", "digits", "--recipe", str(recipe), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    assert "model.onnx" in slimkit.export.artifact.read_manifest(tmp_path / "out" / "mlp.slim")["files"]
    import gc

    gc.collect()
    # not leaks: onnxruntime's session marker (.ses) and torch's compile cache, each one per temp folder, reused
    caches = [p.name for p in temp.iterdir() if p.name == ".ses" or p.name.startswith("torchinductor_")]
    assert sorted(p.name for p in temp.iterdir()) == sorted(caches)
