"""A quiet terminal (stages/quiet.py): progress bars and the stages' own lines, the libraries' chatter
in files; TensorBoard event files beside DVCLive's plots."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, env, repro_output


def test_deepspeed_import_prints_nothing_once_silenced():
    code = "from stages.errors import silence_deepspeed; silence_deepspeed(); import deepspeed"
    quiet = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True)
    assert quiet.returncode == 0, quiet.stderr
    assert "accelerator" not in quiet.stdout + quiet.stderr
    loud = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env(), "PIPELINE_VERBOSE": "1"},
                          capture_output=True, text=True)
    assert "ds_accelerator" in loud.stdout + loud.stderr  # the filter is what hides it


def test_repro_prints_the_stages_lines_not_the_libraries(built):
    out = repro_output(built).read_text(encoding="utf-8")
    lines = out.splitlines()
    assert not [line for line in lines if " - mmengine - " in line or "real_accelerator" in line], out[-3000:]
    assert "[train] XTuner's log: models/work/" in out
    assert "[train] reports/train: " in out and "tensorboard --logdir models/tensorboard" in out
    assert re.search(r"^\[train\] step (\d+)/\1, loss \d", out, re.M), out  # a pipe gets plain progress lines
    assert len(lines) < 120, f"{len(lines)} lines:\n{out[-3000:]}"
    log = (built / "reports/train/xtuner.log").read_text(encoding="utf-8")
    assert "System environment:" in log and "Config:" in log and "Iter(train)" in log


def test_tensorboard_events_hold_the_logged_steps(built):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tsv = (built / "reports/train/plots/metrics/train/loss.tsv").read_text().splitlines()[1:]
    logged = {int(step): float(value) for step, value in (row.split("\t") for row in tsv)}
    for folder in [built / "reports/train/tensorboard", *sorted((built / "models/tensorboard").iterdir())]:
        events = EventAccumulator(str(folder))
        events.Reload()
        loss = {e.step: e.value for e in events.Scalars("train/loss")}
        assert loss.keys() == logged.keys(), folder
        assert all(abs(loss[s] - logged[s]) < 1e-4 for s in logged)


def test_a_stage_run_by_a_python_without_the_stack_says_so_in_one_line(capsys):
    """`.venv/bin/dvc repro` without .venv/bin on PATH runs the stages with the system's `python`: the first
    missing package is named with that interpreter, in one line; a missing module of the project's own is a
    bug and keeps its traceback."""
    from stages.errors import run

    def main(argv):
        raise ModuleNotFoundError("No module named 'ruamel'", name="ruamel")

    with pytest.raises(SystemExit) as exit:
        run(main, [])
    err = capsys.readouterr().err
    assert exit.value.code == 1 and err.count("\n") == 1
    assert err.startswith(f"error: the Python package 'ruamel' is not installed for {sys.executable}: run the stages")

    def bug(argv):
        raise ModuleNotFoundError("No module named 'stages.nope'", name="stages.nope")

    with pytest.raises(ModuleNotFoundError):
        run(bug, [])
