"""Search on a real PostgreSQL (started by tests/tuning/conftest.py): workers join by URL and study name alone, a
killed worker's trial is failed and retried, the study ends with exactly n_trials, the saved best is the study's."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import optuna
import pytest

from slimkit.tuning.config import SearchConfig
from slimkit.tuning.pareto import best_index
from slimkit.tuning.results import candidate_of
from slimkit.tuning.saving import read_result
from slimkit.tuning.storage import open_storage, retry_trial, trial_over_budget

WORKER = textwrap.dedent("""
    import os, sys, time, pathlib, torch
    import slimkit
    from slimkit.tuning import SearchConfig, search
    from slimkit.tuning import study as study_module
    torch.set_num_threads(1)
    out, url, name, n_trials, me, other = sys.argv[1:7]
    if os.environ.get("SLOW_TRIAL"):  # the victim: a trial (its parameters drawn) long enough to be killed
        run_params = study_module.run_params
        def slow(*args):
            time.sleep(float(os.environ["SLOW_TRIAL"]))
            return run_params(*args)
        study_module.run_params = slow
    pathlib.Path(me).touch()
    while not pathlib.Path(other).exists():  # start together
        time.sleep(0.01)
    train, test = slimkit.data.load("digits")
    torch.manual_seed(0)
    model = slimkit.models.create("mlp", in_features=64, hidden=16)
    space = {"lr": {"type": "float", "low": 1e-3, "high": 0.3, "log": True}, "batch_size": 64}
    cfg = SearchConfig(n_trials=int(n_trials), epochs=1, space=space, out=out, storage=url, study_name=name,
                       progress=False, pruner="none")
    search(model, cfg, train, test)
""")


def _worker(tmp_path, out, url, name, n_trials, me, other, **env):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    # a 2 s heartbeat (stale after 6 s) leaves a busy CI machine margin before a live worker looks dead
    env = {**os.environ, "SLIMKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "SLIMKIT_SEARCH_HEARTBEAT": "2", **env}
    return subprocess.Popen(
        [sys.executable, str(script), str(out), url, name, str(n_trials), str(tmp_path / me), str(tmp_path / other)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _trials(url, name):
    try:
        return optuna.load_study(study_name=name, storage=open_storage(url)).get_trials(deepcopy=False)
    except KeyError:  # not created yet
        return []


def test_workers_join_by_url_a_killed_worker_is_retried_and_the_study_ends_at_n_trials(tmp_path, postgres_url):
    name, n_trials, out = "pg-study", 6, tmp_path / "run"
    survivor = _worker(tmp_path, out, postgres_url, name, n_trials, "a.ready", "b.ready")
    victim = _worker(tmp_path, out, postgres_url, name, n_trials, "b.ready", "a.ready", SLOW_TRIAL="30")
    try:
        deadline, running = time.monotonic() + 120, []
        while not running and time.monotonic() < deadline and victim.poll() is None:
            time.sleep(0.2)
            running = [
                t
                for t in _trials(postgres_url, name)
                if t.state == optuna.trial.TrialState.RUNNING
                and t.user_attrs.get("worker", "").endswith(f":{victim.pid}")
                and t.params  # its parameters drawn (the worker tag is written just before they are)
            ]
        assert running, f"the victim never ran a trial: {victim.stderr.read().decode()[-2000:]}"
        os.kill(victim.pid, signal.SIGKILL)  # mid-trial: it sleeps 30 s before it trains
        victim.wait()
        assert survivor.wait(timeout=120) == 0, survivor.stderr.read().decode()[-3000:]
    finally:
        for p in (survivor, victim):
            p.kill()
            p.wait()
    trials = _trials(postgres_url, name)
    by_number = {t.number: t for t in trials}
    killed = by_number[running[0].number]
    assert killed.state == optuna.trial.TrialState.FAIL  # its heartbeat stopped: not left RUNNING
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].params == killed.params
    assert retries[0].state == optuna.trial.TrialState.COMPLETE  # run again by the survivor
    assert not [t for t in trials if not t.state.is_finished()]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == n_trials  # exactly: the killed trial does not count, nothing overshoots
    cands = [candidate_of(t) for t in complete]
    best = cands[best_index(cands, ("accuracy",), ("maximize",))]
    saved = read_result(out / "best")
    assert saved["trial"] == best.number and saved["values"] == list(best.values)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask/tell by hand, as workers racing would
def test_a_trial_created_after_the_budget_was_taken_does_not_run(postgres_url):
    """Two workers ask at once for the last slot: the later trial sees the earlier and stands back; a queued
    retry holds its slot too."""
    storage = open_storage(postgres_url)
    study = optuna.create_study(storage=storage, study_name="budget")
    first, second = study.ask(), study.ask()  # created by two racing workers
    assert not trial_over_budget(study, first.number, 1)
    assert trial_over_budget(study, second.number, 1)
    assert not trial_over_budget(study, second.number, 2)
    study.tell(second, state=optuna.trial.TrialState.FAIL)  # turned away
    study.tell(first, 1.0)
    lost = study.ask()
    study.tell(lost, state=optuna.trial.TrialState.FAIL)  # as if its worker died
    retry_trial(study, study.trials[lost.number])  # queued as WAITING: it holds the second slot
    queued = study.trials[-1]
    assert queued.state == optuna.trial.TrialState.WAITING and queued.params == lost.params
    assert trial_over_budget(study, queued.number + 1, 2)  # a new trial created now would stand back
    popped = study.ask()  # the next ask runs the queued retry, which keeps its slot
    assert popped.number == queued.number and study.trials[popped.number].system_attrs["failed_trial"] == lost.number
    assert not trial_over_budget(study, popped.number, 2)


def test_storage_url_alone_reaches_the_study_and_bad_heartbeat_is_refused(postgres_url, monkeypatch):
    from slimkit.errors import UsageError

    cfg = SearchConfig(storage=postgres_url, study_name="by-url")
    assert cfg.storage_url == postgres_url
    monkeypatch.setenv("SLIMKIT_SEARCH_HEARTBEAT", "0")
    with pytest.raises(UsageError, match="SLIMKIT_SEARCH_HEARTBEAT"):
        open_storage(postgres_url)
