"""The speed benchmark's report, from the results file of the GPU call it reports, and the plain
tokenizer that lets the peer libraries load a random model without remote code."""
import json
import subprocess
import sys
from pathlib import Path

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
    assert lines[-1].startswith(f"{stage['run']}: {stage['tokens_per_s'] / best['tokens_per_s']:.3f}x the best peer")
    assert sum(line.startswith("| Unsloth") for line in lines) == 2
    assert sum(line.startswith("| train stage") for line in lines) == 2


def test_report_compares_the_run_it_is_told_and_names_the_runs_otherwise():
    path = RESULTS.with_name("fp8-same-call.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    fp8 = next(r for r in records if r["run"].endswith("train.fp8"))
    unsloth = next(r for r in records if r["run"] == "peer")
    lines = speed_report.rows(records, "train.fp8")
    assert lines[-1].startswith(f"{fp8['run']}: {fp8['tokens_per_s'] / unsloth['tokens_per_s']:.3f}x the best peer")
    assert lines[-1].startswith(f"{fp8['run']}: 1.337x")  # the call's figures (1.34x in benchmarks/README.md)
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


def test_select_cost_splits_each_run_into_its_phases_and_draws_them(tmp_path, capsys):
    """benchmarks/select_cost.py on call 14's stamped logs: the phases add up to the run, the wait for the scorer
    is in the runs beside it only, and benchmarks/README.md's means come out (select 2.0 s beside, 13-15 s after)."""
    from benchmarks import select_cost

    logs = sorted(str(p) for p in (ROOT / "benchmarks" / "results" / "select").glob("call14-train-*.log"))
    assert len(logs) == 5
    runs = {select_cost.label(Path(log)): select_cost.phases(Path(log)) for log in logs}
    for run, p in runs.items():
        assert sum(v for k, v in p.items() if k != "total") == pytest.approx(p["total"], abs=0.05), run
        assert (p["waiting for the scorer"] > 1) == ("beside" in run), run
    beside = [p["select stage"] for run, p in runs.items() if "beside" in run]
    assert 1.5 < sum(beside) / len(beside) < 2.5 and all(13 < p["select stage"] < 15 for run, p in runs.items()
                                                          if "no scorer" in run)
    select_cost.main(logs)
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 2 + 5 and table[2].startswith("| call 14, run 2, no scorer |")
    select_cost.main(["--plot", str(tmp_path / "phases.png"), *logs])
    assert (tmp_path / "phases.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit) as exit:
        select_cost.main([str(RESULTS)])  # a results file, not a stamped log
    assert str(exit.value).endswith("not the stamped output of `dvc repro -f -s train select` (stage_runs.sh select-cost)")


def test_stage_memory_replays_the_allocator_history_to_its_peak_and_names_who_made_it(tmp_path, capsys):
    """benchmarks/stage_memory.py on a history shaped as torch's `_snapshot()` writes it (CUDA only, so made here):
    the peak is where the allocated total was highest, a free of a block older than the history counts below
    zero, and each live block is named by the innermost frame outside torch (compiled code by its caller)."""
    from benchmarks import stage_memory

    torch_frame = {"filename": "/x/site-packages/torch/nn/functional.py", "line": 10, "name": "linear"}
    kernels = {"filename": "/work/p/stages/kernels.py", "line": 99, "name": "forward"}
    generated = {"filename": "/tmp/torchinductor_root/ab/cabc123.py", "line": 7, "name": "call"}
    model = {"filename": "/h/.cache/huggingface/modules/transformers_modules/m/modeling_internlm2.py", "line": 5,
             "name": "forward"}
    G = 10**7  # sizes in hundredths of a GB
    trace = [{"action": "free_completed", "addr": 1, "size": 40 * G},  # allocated before the history began
             {"action": "alloc", "addr": 2, "size": 100 * G, "frames": [torch_frame, kernels]},
             {"action": "alloc", "addr": 3, "size": 70 * G, "frames": [generated, torch_frame, model]},
             {"action": "alloc", "addr": 4, "size": 30 * G, "frames": [torch_frame]},
             {"action": "free_requested", "addr": 2, "size": 100 * G},
             {"action": "free_completed", "addr": 2, "size": 100 * G},
             {"action": "alloc", "addr": 5, "size": 50 * G, "frames": [kernels]}]
    added, live = stage_memory.peak_of(trace)
    assert added == 160 * G and sorted(live) == [2, 3, 4]  # -40 + 100 + 70 + 30, before the free of 2
    line = stage_memory.summarize({"device_traces": [trace]}, before=1000 * G, top=2)
    assert (line["before_gb"], line["added_gb"], line["peak_gb"], line["events"]) == (10.0, 1.6, 11.6, 7)
    assert [row["site"] for row in line["live_at_peak"]] == [
        "stages/kernels.py:99 (forward)", "compiled code called from m/modeling_internlm2.py:5 (forward)", "1 other sites"]
    assert line["live_at_peak"][0]["largest"] == "1,000 MB x1"
    assert line["peak_reached_by"] == []  # the last block made before the peak: torch's own frames alone
    (tmp_path / "memory.jsonl").write_text(json.dumps(line) + "\n")
    stage_memory.main([str(tmp_path / "memory.jsonl")])
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("reached in ?")
    assert out[2] == "| made by | GB at the peak | blocks | largest |" and out[-1] == "| 1 other sites | 0.300 | 1 | 300 MB x1 |"
    with pytest.raises(SystemExit) as exit:
        stage_memory.main([str(RESULTS)])  # a results file of another kind
    assert "not a file of StageMemory's JSON lines" in str(exit.value)


def test_loss_kernels_time_the_fused_loss_both_ways_and_check_them_against_each_other(tmp_path, capsys):
    """benchmarks/loss_kernels.py on a small head in three chunks (the last one shorter): as written and compiled
    (aot_eager here) give the same loss and gradient; the libraries' lines (Liger Kernel, cut-cross-entropy) say why
    they did not run on a CPU."""
    from benchmarks import loss_kernels

    out = tmp_path / "loss.jsonl"
    loss_kernels.main(["--tokens", "300", "--hidden", "32", "--vocab", "1000", "--reps", "1", "--chunk-mb", "1",
                       "--backend", "aot_eager", "--out", str(out)])
    lines = [json.loads(text) for text in out.read_text().splitlines()]
    assert [line["impl"] for line in lines] == ["eager", "compiled", "liger", "cce"] and lines[0]["chunk_tokens"] == 128
    assert lines[0]["status"] == lines[1]["status"] == "ok" and lines[0]["loss"] > 0
    assert lines[1]["loss_diff"] == 0 and lines[1]["grad_max_diff"] < 1e-6
    assert lines[2]["status"].startswith("skipped: ") and lines[3]["status"].startswith("skipped: ")
    with pytest.raises(SystemExit) as exit:
        loss_kernels.main(["--impls", "eager,fused"])
    assert str(exit.value) == "error: --impls: fused is not one of eager, compiled, liger, cce"


def test_fp8_matmul_measures_each_path_against_float32(tmp_path):
    """benchmarks/fp8_matmul.py on the CPU, one small shape eager: bitsandbytes' bf16 path near float32's product,
    the float8 paths e4m3's rounding off it, and the same with fast accumulation asked for (the CPU has no such
    mode: on the GPU the same lines say whether the sums cost anything)."""
    from benchmarks import fp8_matmul

    out = tmp_path / "fp8.jsonl"
    fp8_matmul.main(["--device", "cpu", "--tokens", "64", "--reps", "1", "--modes", "eager", "--shapes", "1.8B wo",
                     "--out", str(out)])
    lines = {line["path"]: line for line in map(json.loads, out.read_text().splitlines())}
    assert list(lines) == list(fp8_matmul.PATHS)
    assert lines["bnb"]["rel_err_out"] < 0.01 and lines["bnb"]["rel_err_grad_in"] < 0.01
    for path in ("fp8", "fp8-fast", "fp8-fast-both"):
        assert 0.02 < lines[path]["rel_err_out"] < 0.06 and 0.02 < lines[path]["rel_err_grad_in"] < 0.06
        assert lines[path]["rel_err_out"] == lines["fp8"]["rel_err_out"]


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
