"""Storage: a run killed with SIGKILL loses no finished trial; two worker processes share one study."""

import os
import signal
import subprocess
import sys
import textwrap
import time
import weakref

import optuna
import pytest

from slimkit.tuning import SearchConfig, search
from slimkit.tuning.storage import open_storage
from slimkit.tuning.study import _Worker

SCRIPT = textwrap.dedent("""
    import os, sys, time, pathlib, torch
    import slimkit
    from slimkit.tuning import SearchConfig, search
    torch.set_num_threads(1)
    out, storage, n_trials, barrier = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    if barrier:  # start together: both workers must be running while the study fills up
        pathlib.Path(barrier[0]).touch()
        while not pathlib.Path(barrier[1]).exists():
            time.sleep(0.01)
    train, test = slimkit.data.load("digits")
    torch.manual_seed(0)
    model = slimkit.models.create("mlp", in_features=64, hidden=16)
    space = {"lr": {"type": "float", "low": 1e-3, "high": 0.3, "log": True}, "batch_size": 64}
    cfg = SearchConfig(n_trials=n_trials, epochs=1, space=space, out=out, storage=storage or None,
                       progress=False, pruner="none")
    search(model, cfg, train, test)
""")


def _launch(tmp_path, out, storage, n_trials, *barrier):
    script = tmp_path / "worker.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "SLIMKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(script), str(out), storage, str(n_trials), *barrier],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _finished(storage_url, name="slimkit-search"):
    try:
        study = optuna.load_study(study_name=name, storage=open_storage(storage_url))
    except KeyError:  # not created yet
        return {}
    return {
        t.number: tuple(t.values)
        for t in study.get_trials(deepcopy=False)
        if t.state == optuna.trial.TrialState.COMPLETE
    }


@pytest.mark.slow  # a subprocess study (14 s); the PostgreSQL test kills a worker in every default run
def test_sigkill_mid_study_then_rerun_keeps_every_finished_trial(tmp_path, digits):
    out = tmp_path / "run"
    url = f"sqlite:///{out / 'study.db'}"
    proc = _launch(tmp_path, out, "", 60)
    deadline = time.time() + 120
    before = {}
    while time.time() < deadline and len(before) < 3 and proc.poll() is None:
        time.sleep(0.2)
        # open the database only once the run has created it and finished a trial (its best is on disk)
        before = _finished(url) if (out / "best").exists() else {}
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _finished(url)  # everything that finished before the kill
    assert len(before) >= 3
    assert (out / "best" / "result.json").is_file()  # the best so far is already on disk
    train, test = digits
    import torch

    import slimkit

    torch.manual_seed(0)
    model = slimkit.models.create("mlp", in_features=64, hidden=16)
    n_total = len(before) + 2  # the rerun only has to add a couple of trials
    cfg = SearchConfig(
        n_trials=n_total,
        epochs=1,
        out=str(out),
        progress=False,
        pruner="none",
        space={"lr": {"type": "float", "low": 1e-3, "high": 0.3, "log": True}, "batch_size": 64},
    )
    study = search(model, cfg, train, test)
    after = _finished(url)
    assert all(after[n] == v for n, v in before.items())  # no finished trial lost or changed
    assert study.finished >= n_total
    assert study.best.metrics["accuracy"] >= max(v[0] for v in before.values())


@pytest.mark.slow  # two worker processes (15-20 s each); the PostgreSQL test runs two workers in every default run
@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_two_workers_share_one_study_without_duplicate_numbers(tmp_path, kind):
    url = f"journal:{tmp_path / 'study.log'}" if kind == "journal" else f"sqlite:///{tmp_path / 'study.db'}"
    a = _launch(tmp_path, tmp_path / "run", url, 8, str(tmp_path / "a.ready"), str(tmp_path / "b.ready"))
    b = _launch(tmp_path, tmp_path / "run", url, 8, str(tmp_path / "b.ready"), str(tmp_path / "a.ready"))
    for p in (a, b):
        assert p.wait(timeout=180) == 0, p.stderr.read().decode()[-3000:]
    study = optuna.load_study(study_name="slimkit-search", storage=open_storage(url))
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) and sorted(numbers) == list(range(len(numbers)))
    finished = [t for t in trials if t.state.is_finished()]
    assert len(finished) >= 8
    workers = {t.user_attrs["worker"].split(":")[1] for t in trials if "worker" in t.user_attrs}
    assert len(workers) == 2  # both processes ran trials


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_ctrl_c_prints_one_line_and_leaves_no_worker_running(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {type: float, low: 0.001, high: 0.3, log: true}\nbatch_size: 64\n")
    out = tmp_path / "run"
    cli = [os.path.join(os.path.dirname(sys.executable), "slimkit")]
    args = [
        *cli,
        "search",
        "--model",
        "mlp",
        "--model-args",
        '{"in_features": 64, "hidden": 16}',
        "--data",
        "digits",
        "--space",
        str(space),
        "--epochs",
        "1",
        "--n-trials",
        "500",
        "--workers",
        "2",
        "--pruner",
        "none",
        "--out",
        str(out),
    ]
    env = {**os.environ, "SLIMKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    # its own session: Ctrl-C reaches the whole foreground process group, the CLI and its spawned worker
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    url, helpers = f"sqlite:///{out / 'study.db'}", set()
    deadline = time.time() + 120
    while not helpers and time.time() < deadline and proc.poll() is None:
        time.sleep(0.3)
        if (out / "best").exists():
            study = optuna.load_study(study_name="slimkit-search", storage=open_storage(url))
            helpers = {
                int(t.user_attrs["worker"].split(":")[1])
                for t in study.get_trials(deepcopy=False)
                if t.user_attrs.get("worker", "").startswith("1:")
            }
    assert helpers, f"the spawned worker never ran a trial: {proc.communicate()[1].decode()[-2000:]}"
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    output = (stdout + stderr).decode()
    assert proc.returncode == 2, output[-3000:]
    assert "interrupted (Ctrl-C)" in output and "Traceback" not in output, output[-3000:]
    assert not [pid for pid in helpers if _alive(pid)]


def _bare_worker() -> _Worker:
    """A worker with only its Ctrl-C state (no study): what the signal handling reads and writes."""
    worker = _Worker.__new__(_Worker)
    worker._interruptible = worker._interrupted = False
    worker._redelivery = None
    return worker


class _Plain:
    pass


class _Finalized:
    def __init__(self, done: list) -> None:
        self.done = done

    def __del__(self) -> None:
        signal.raise_signal(signal.SIGINT)  # handled here, inside the finalizer
        self.done.append("finished")


@pytest.mark.parametrize("finalizer", ["weakref callback", "__del__"])
def test_ctrl_c_landing_in_a_finalizer_is_delivered_after_it_without_a_traceback(capfd, finalizer):
    # CI once saw Ctrl-C land in SQLAlchemy's weakref callback: Python printed "Exception ignored ... Traceback"
    # and dropped the KeyboardInterrupt, so the trial went on
    worker = _bare_worker()
    done: list[str] = []
    before = signal.getsignal(signal.SIGINT)
    restore = worker._catch_sigint()
    try:
        with pytest.raises(KeyboardInterrupt), worker._interruptible_section():
            if finalizer == "__del__":
                thing = _Finalized(done)
            else:  # a raw callback: only the unraisable hook sees the drop
                thing = _Plain()
                ref = weakref.ref(thing, lambda _: signal.raise_signal(signal.SIGINT))
            del thing
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # a training loop: the interrupt must reach it, not the trial's end
                time.sleep(0.005)
    finally:
        restore()
    assert worker._interrupted and "Exception ignored" not in capfd.readouterr().err
    assert done == ([] if finalizer == "weakref callback" else ["finished"])  # __del__ runs to its end
    assert signal.getsignal(signal.SIGINT) is before
    if finalizer == "weakref callback":
        assert ref() is None


def test_an_interrupt_dropped_as_its_section_ends_is_not_delivered_after_the_study():
    worker = _bare_worker()
    restore = worker._catch_sigint()
    try:
        with worker._interruptible_section():
            thing = _Finalized([])  # the last statement of the section: the redelivery finds it ended
            del thing
    finally:
        restore()
    time.sleep(0.1)  # a redelivery left pending would raise KeyboardInterrupt here
    assert worker._interrupted
    with pytest.raises(KeyboardInterrupt):
        worker._check_interrupt()  # the flag stops the study at its next check
