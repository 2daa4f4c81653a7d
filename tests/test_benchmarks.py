"""The speed benchmark's report, from the results file of the GPU call it reports, and the plain
tokenizer that lets the peer libraries load a random model without remote code."""
import json
import subprocess
import sys

import pytest

from benchmarks import speed_report
from tests.conftest import ROOT

RESULTS = ROOT / "benchmarks" / "results" / "speed" / "side-by-side.jsonl"


def test_report_gives_each_run_and_the_stage_against_the_best_peer():
    records = [json.loads(line) for line in RESULTS.read_text().splitlines()]
    lines = speed_report.rows(records)
    stage = next(r for r in records if r["run"].startswith("train stage"))
    best = max((r for r in records if r["run"] == "peer"), key=lambda r: r["tokens_per_s"])
    assert best["lib"] == "unsloth"
    assert lines[-1].startswith(f"{stage['run']}: {stage['tokens_per_s'] / best['tokens_per_s']:.2f}x the best peer")
    assert sum(line.startswith("| Unsloth") for line in lines) == 2
    assert sum(line.startswith("| train stage") for line in lines) == 2


def test_report_compares_the_run_it_is_told_and_names_the_runs_otherwise():
    path = RESULTS.with_name("fp8-same-call.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    fp8 = next(r for r in records if r["run"].endswith("train.fp8"))
    unsloth = next(r for r in records if r["run"] == "peer")
    lines = speed_report.rows(records, "train.fp8")
    assert lines[-1].startswith(f"{fp8['run']}: {fp8['tokens_per_s'] / unsloth['tokens_per_s']:.2f}x the best peer")
    assert lines[-1].startswith(f"{fp8['run']}: 1.34x")  # the call's figures, as benchmarks/README.md gives them
    # the command line: a bad choice is one line on stderr, exit 1, no traceback
    result = subprocess.run([sys.executable, "-m", "benchmarks.speed_report", str(path), "--stage", "fp16"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("--stage: no train-stage run named with 'fp16'; the runs: train stage")


def test_the_picture_has_a_panel_a_call_and_bad_input_is_one_line(tmp_path, capsys):
    calls = [str(RESULTS.with_name(name)) for name in ("fp8-same-call.jsonl", "lean7b-fp8-lever.jsonl")]
    speed_report.main(["--plot", str(tmp_path / "speed.png"), "--budget", "24", "--budget", "8", *calls])
    png = (tmp_path / "speed.png").read_bytes()
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and width > 2 * height  # two panels side by side
    speed_report.main(["--plot", str(tmp_path / "one.png"), calls[0]])
    assert int.from_bytes((tmp_path / "one.png").read_bytes()[16:20], "big") < width
    for args, message in [(["--plot", str(tmp_path / "x.png"), "--budget", "24", *calls], "--budget: 1 given for 2"),
                          ([str(tmp_path / "absent.jsonl")], f"{tmp_path / 'absent.jsonl'}: not a speed.sh results"),
                          (calls, "one results file a table")]:
        with pytest.raises(SystemExit) as exit:
            speed_report.main(args)
        assert str(exit.value).startswith(message) and "\n" not in str(exit.value)
    assert not (tmp_path / "x.png").exists()


def test_the_shell_scripts_parse():
    """The GPU host's scripts run only there (no CI machine has the GPU): `bash -n` here, so that an edit that
    breaks one shows before a device call is spent on it."""
    scripts = sorted([*ROOT.glob("benchmarks/*.sh"), *ROOT.glob("scripts/*.sh"), ROOT / ".ci" / "run"])
    assert len(scripts) > 10
    for script in scripts:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script.relative_to(ROOT)}: {result.stderr}"


def test_plain_tokenizer_has_one_token_per_id():
    sys.path.insert(0, str(ROOT / "scripts"))
    import random_model

    tok = random_model.plain_tokenizer(50)
    assert len(tok) == 50 and tok("t4 t49").input_ids == [4, 49] and tok.eos_token_id == 2
