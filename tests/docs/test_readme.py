"""Every code block of the README and both classic examples run verbatim (``make test-docs``, run by .ci/run).

The Python blocks run in order in one interpreter (a later block uses what an earlier one defined, as a reader
pasting them would); the bash blocks run in the same scratch folder with the venv's ``slimkit`` on PATH. The
set-up block (``make demo`` / ``make test``) is what ``.ci/run`` itself runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.docs

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```(python|bash)\n(.*?)^```", README, flags=re.S | re.M)


def _env() -> dict[str, str]:
    env = dict(os.environ, SLIMKIT_NO_PROGRESS="1", COLUMNS="120")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def _run(args: list[str], cwd: Path, timeout: int = 900) -> str:
    done = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)[:200]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _is_setup(code: str) -> bool:
    commands = [line.split("#")[0].strip() for line in code.splitlines()]
    return all(c in ("", "make demo", "make test") for c in commands)


def test_readme_has_the_blocks_this_test_runs():
    kinds = [kind for kind, _ in BLOCKS]
    assert kinds.count("python") >= 2 and kinds.count("bash") >= 2, kinds
    setup = [code for kind, code in BLOCKS if kind == "bash" and _is_setup(code)]
    assert len(setup) == 1, "exactly one set-up block (make demo / make test)"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make demo" in ci and "make test-docs" in ci, ".ci/run must run the set-up block"


def test_readme_blocks_run_verbatim(tmp_path):
    python = "\n".join(code for kind, code in BLOCKS if kind == "python")
    out = _run([sys.executable, "-c", python], tmp_path)
    assert re.search(r"\d+\.\d\d%", out), out[-2000:]
    assert slimkit_artifact(tmp_path / "out" / "lenet5.slim")
    for kind, code in BLOCKS:
        if kind == "bash" and not _is_setup(code):
            _run(["bash", "-e", "-o", "pipefail", "-c", code], tmp_path)
    assert (tmp_path / "lenet5.safetensors").is_file()
    assert (tmp_path / "out" / "lenet5.slim" / "report.html").is_file()


def slimkit_artifact(path: Path) -> bool:
    import slimkit

    return slimkit.load(path) is not None


def _example_commands() -> list[str]:
    return sorted(set(re.findall(r"`(python examples/[^`]+)`", README)))


def test_readme_names_both_examples():
    scripts = {cmd.split()[1] for cmd in _example_commands()}
    assert scripts == {"examples/mnist_mlp.py", "examples/cifar10_alexnet.py"}, scripts


# the plain AlexNet command downloads CIFAR-10 (no network here); its documented --offline setting runs instead
OFFLINE = [cmd for cmd in _example_commands() if cmd != "python examples/cifar10_alexnet.py"]


@pytest.mark.parametrize("command", OFFLINE)
def test_examples_run_verbatim(command, tmp_path):
    args = command.split()
    out = _run([sys.executable, str(ROOT / args[1]), *args[2:]], tmp_path)
    accuracy = float(re.search(r"test accuracy: ([\d.]+)%", out).group(1))
    assert accuracy >= 90.0, out[-2000:]
