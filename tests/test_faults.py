"""Damaged artifacts give one line, not a stack trace from deep inside torch; a DVC remote carries
results from one clone to another so that nothing reruns."""
import signal
import subprocess
import sys

import pytest

from stages import convert, evaluate, merge
from tests.conftest import assert_one_line_error, env, run_stage, sh, tree_digest

pytestmark = pytest.mark.e2e


def test_damaged_training_checkpoint(project, capsys):
    (project / "models/adapter.pth").write_bytes(b"PK\x03\x04 not a checkpoint")
    code, err = run_stage(convert, capsys)
    assert_one_line_error(code, err, "models/adapter.pth: not a readable XTuner checkpoint")


def test_damaged_adapter(project, capsys):
    (project / "models/adapter/adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    code, err = run_stage(merge, capsys)
    assert_one_line_error(code, err, "models/adapter: the adapter does not load")


def test_damaged_merged_model(project, capsys):
    path = project / "models/merged/model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    code, err = run_stage(evaluate, capsys)
    assert_one_line_error(code, err, "models/merged: the model in models/merged does not load")


# Runs a stage and SIGKILLs it the moment it opens its first file in the new output's temporary
# folder for writing (an audit hook: the kill lands mid-write every time, not by timing luck).
KILL_ON_WRITE = """
import os, runpy, signal, sys
def hook(event, args):
    if event == "open" and "_{name}_partial_" in str(args[0]) and isinstance(args[2], int) \\
            and args[2] & (os.O_WRONLY | os.O_RDWR):
        os.kill(os.getpid(), signal.SIGKILL)
    if event == "open" and "_{name}_partial_" in str(args[0]) and isinstance(args[1], str) and "w" in args[1]:
        os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(hook)
sys.argv = ["{module}"]
runpy.run_module("{module}", run_name="__main__")
"""


def test_stage_killed_while_writing_leaves_the_old_output(project):
    """SIGKILL while merge writes its model: models/merged is the old one, whole, and the next
    stage reads it."""
    before = tree_digest(project / "models/merged")
    proc = subprocess.run([sys.executable, "-c", KILL_ON_WRITE.format(name="merged", module="stages.merge")],
                          cwd=project, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert tree_digest(project / "models/merged") == before
    sh(sys.executable, "-m", "stages.evaluate", cwd=project)


def test_results_travel_through_a_remote_and_nothing_reruns(project, tmp_path):
    store = tmp_path / "dvc-store"
    sh("dvc", "remote", "add", "-d", "store", str(store), cwd=project)
    sh("git", "add", "-A", cwd=project)
    sh("git", "commit", "-q", "--allow-empty", "-m", "results", cwd=project)
    sh("dvc", "push", "-q", cwd=project)
    other = tmp_path / "other"
    sh("git", "clone", "-q", str(project), str(other), cwd=tmp_path)
    sh("dvc", "pull", "-q", cwd=other)
    assert (other / "models/merged/model.safetensors").is_file()
    out = sh("dvc", "repro", cwd=other).stdout
    assert "Running stage" not in out and "Data and pipelines are up to date" in out
    assert sh(sys.executable, "-m", "stages.params", cwd=other).returncode == 0
