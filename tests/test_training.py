"""The training chain on the tiny model, with the real XTuner and DVC: outputs, an experiment,
resume after a kill, clean start after a change, byte-identical reruns."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import copy_project, env, sh

pytestmark = pytest.mark.e2e


def test_outputs_hold_real_results(built):
    import torch

    adapter = torch.load(built / "models/adapter.pth", weights_only=True)
    assert set(adapter) == {"state_dict"}  # weights only, no optimizer state
    assert adapter["state_dict"] and all("lora_" in k for k in adapter["state_dict"])
    assert (built / "models/adapter/adapter_model.safetensors").is_file()
    metrics = json.loads((built / "reports/train/metrics.json").read_text())
    assert metrics["iters"] > 0 and metrics["final_loss"] < metrics["first_loss"]
    assert metrics["tokens_per_sec"] > 0 and metrics["peak_memory_mb"] > 0 and metrics["wall_time_s"] > 0
    loss = (built / "reports/train/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert loss[0] == "step\tloss" and len(loss) == metrics["iters"] + 1
    merge = json.loads((built / "reports/merge.json").read_text())
    assert 0 <= merge["max_logit_diff"] <= merge["tolerance"]
    assert not list((built / "models/work").glob("*/vis_data/*dvc*"))  # no mmengine DVCLive backend


def test_merged_model_answers_as_base_plus_adapter_token_for_token(built):
    """What the merge must keep: on every evaluation prompt the merged model's greedy answer is base+adapter's
    (peft, unmerged), token for token; and the adapter matters (base alone answers otherwise somewhere)."""
    from stages import params as P
    from stages.xtuner_api import patch_stack

    patch_stack()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = P.load(built / "params.yaml").assistant.prompts
    tok = AutoTokenizer.from_pretrained(built / "models/merged", trust_remote_code=True)

    def answers(model) -> list[list[int]]:
        out = []
        for prompt in prompts:
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          return_tensors="pt")
            with torch.no_grad():
                gen = model.eval().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
            out.append(gen[0, ids.shape[1]:].tolist())
        return out

    def base():
        return AutoModelForCausalLM.from_pretrained(built / "models/assistant/llm", torch_dtype=torch.float32,
                                                    trust_remote_code=True)

    merged = answers(AutoModelForCausalLM.from_pretrained(built / "models/merged", torch_dtype=torch.float32,
                                                          trust_remote_code=True))
    tuned = answers(PeftModel.from_pretrained(base(), str(built / "models/adapter"), is_trainable=False))
    assert merged == tuned
    assert all(tok.decode(a, skip_special_tokens=True).strip() for a in merged)
    assert answers(base()) != tuned


def test_lora_rank_experiment_reruns_only_the_training_chain(project):
    sh("git", "add", "-A", cwd=project)
    sh("git", "commit", "-q", "--allow-empty", "-m", "baseline", cwd=project)
    # 30 iterations: the rank's effect on the chain, not the whole schedule again
    out = sh("dvc", "exp", "run", "-S", "lora.r=32", "-S", "train.max_iters=30", "-n", "r32", cwd=project).stdout
    import re

    assert re.findall(r"Running stage '(\w+)'", out) == ["render", "train", "select", "convert", "merge", "evaluate",
                                                          "report"]
    params = json.loads(sh("dvc", "params", "diff", "--json", cwd=project).stdout)["params.yaml"]
    assert (params["lora.r"]["old"], params["lora.r"]["new"]) == ("auto", 32)  # auto: the recipe's preset, 64
    metrics = json.loads(sh("dvc", "metrics", "diff", "--json", cwd=project).stdout)
    assert "final_loss" in metrics["reports/train/metrics.json"]
    plots = sh("dvc", "plots", "diff", "--json", cwd=project).stdout
    assert "loss" in plots
    # the review of an experiment, as the README tells users to do it
    sh(sys.executable, "-m", "stages.compare", "HEAD", "r32", cwd=project)
    report = (project / "reports/compare/compare.md").read_text(encoding="utf-8")
    assert "| lora.r | auto | 32 |" in report
    loss = metrics["reports/train/metrics.json"]["final_loss"]  # HEAD and the experiment, as DVC diffs them
    old, new = loss["old"], loss["new"]
    diff = new - old
    assert diff  # another rank, another loss
    row = next(line for line in report.splitlines() if line.startswith("| final_loss |"))
    assert row == f"| final_loss | {old:g} | {new:g} ({diff:+.4g}) ({diff / old:+.1%}) |"
    assert (project / "reports/compare/loss.png").is_file()
    assert report.count("| trained |") == 3


def test_compare_refuses_unknown_revisions(project):
    proc = sh(sys.executable, "-m", "stages.compare", "HEAD", "no-such-exp", cwd=project, check=False)
    assert proc.returncode == 1 and "no-such-exp: not a commit" in proc.stderr and "Traceback" not in proc.stderr


def _train(project, *extra):
    return subprocess.Popen([sys.executable, "-m", "stages.train", *extra], cwd=project, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def last_checkpoint(project):
    """The train stage's last checkpoint (models/checkpoints/iter_N.pth, the largest N)."""
    return max((project / "models/checkpoints").glob("iter_*.pth"), key=lambda p: int(p.stem.split("_")[1]))


RESUME_ITERS = 100  # the resume tests' schedule (checkpoints at 25, 50, 75, 100), not the default's 676


def shorten(project, iters: int) -> None:
    """train.max_iters: `iters` in the project's params.yaml (the default runs its epochs)."""
    path = project / "params.yaml"
    text = path.read_text(encoding="utf-8")
    assert "  max_iters: auto" in text
    path.write_text(text.replace("  max_iters: auto", f"  max_iters: {iters}"), encoding="utf-8")


@pytest.fixture(scope="module")
def uninterrupted(built, tmp_path_factory) -> tuple[dict, bytes]:
    """The uninterrupted run of the resume tests' schedule, once for both signals (their xdist group keeps
    them in one process): its metrics and its last checkpoint's bytes."""
    dest = tmp_path_factory.mktemp("uninterrupted") / "project"
    copy_project(built, dest)
    shorten(dest, RESUME_ITERS)
    sh("dvc", "repro", "train", cwd=dest)
    return json.loads((dest / "reports/train/metrics.json").read_text()), last_checkpoint(dest).read_bytes()


@pytest.mark.xdist_group("resume")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_training_resumes_and_ends_where_an_uninterrupted_run_ends(project, uninterrupted, sig):
    uninterrupted, reference = uninterrupted
    shorten(project, RESUME_ITERS)
    sh("dvc", "repro", "render", cwd=project)  # that schedule's config; the run below is the first to train it
    shutil.rmtree(project / "models/work")
    shutil.rmtree(project / "models/checkpoints")  # as in a first run: `dvc repro` must train
    proc = _train(project)
    deadline = time.time() + 240
    while not (project / "models/work/last_checkpoint").exists() or \
            "iter_50" not in (project / "models/work/last_checkpoint").read_text():
        assert proc.poll() is None and time.time() < deadline, "training ended before its first checkpoint"
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert not _alive(proc.pid)  # the trainer ran in the stage's process: nothing survives it
    assert not (project / "models/checkpoints").exists()  # nothing half-written for select to trust
    # -f: without it DVC checks the uninterrupted run's outputs out of its cache (what a user wants,
    # not what this test is about).
    out = sh("dvc", "repro", "-f", "-s", "train", cwd=project).stdout
    assert "resuming from" in out and "iter_50.pth" in out
    # mmengine's resume notices (the checkpoint's path, every frozen weight the adapter's checkpoint lacks) go
    # to the trainer's log, not the terminal (stages/xtuner_api.py mmengine_errors_only)
    assert "Loads checkpoint" not in out and "missing keys" not in out, out[-2000:]
    metrics = json.loads((project / "reports/train/metrics.json").read_text())
    assert metrics["iters"] == uninterrupted["iters"] == RESUME_ITERS
    # The uninterrupted run's result, to the byte: the data order and the schedule resume exactly, and so
    # does the random generator LoRA dropout draws from (stages/xtuner_api.py `_resume_randomness`).
    assert metrics["final_loss"] == uninterrupted["final_loss"]
    assert last_checkpoint(project).read_bytes() == reference


def test_changed_inputs_start_clean(project):
    shorten(project, 10)  # the message comes before training; a short schedule keeps the run short
    sh("dvc", "repro", "render", cwd=project)
    cfg = project / "models/config/xtuner_config.py"
    text = cfg.read_text()
    assert "\nlr = " in text
    cfg.write_text(text.replace("\nlr = ", "\nlr = 0.5 * "))
    out = sh(sys.executable, "-m", "stages.train", cwd=project).stdout
    assert "inputs changed or no checkpoint; starting clean" in out and "resuming" not in out


def test_rerun_gives_a_byte_identical_adapter(project, tmp_path):
    """Two whole training runs of one schedule (30 iterations, checkpoints at 25 and 30), then select and
    convert: the same bytes."""
    shorten(project, 30)
    sh("dvc", "repro", "convert", cwd=project)
    first = tmp_path / "first"
    shutil.copytree(project / "models", first, symlinks=True)
    shutil.rmtree(project / "models/work")  # no checkpoint to resume from: a whole new training run
    out = sh("dvc", "repro", "-f", "-s", "train", "select", "convert", cwd=project).stdout
    assert "resuming" not in out
    checkpoints = sorted(p.relative_to(first).as_posix() for p in (first / "checkpoints").iterdir())
    assert len(checkpoints) == 2
    for path in checkpoints + ["adapter.pth", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"]:
        assert (project / "models" / path).read_bytes() == (first / path).read_bytes(), path


# The embedded default's loss curve (tiny InternLM2, 676 steps on the CPU), as windows of 10 steps at the
# start, the middle and the end. Training is byte-deterministic on one machine; another CPU's kernels
# round differently, hence 3%. A change that alters training (data, schedule, model, kernels) shows here.
PINNED_LOSS = {"steps": 676, "first": 4.537, "middle": 1.396, "final": 0.796}


def test_the_embedded_default_loss_curve_is_pinned(built):
    lines = (built / "reports/train/plots/metrics/train/loss.tsv").read_text().splitlines()[1:]
    loss = [float(line.split("\t")[1]) for line in lines]
    mid = len(loss) // 2
    seen = {"steps": len(loss), "first": sum(loss[:10]) / 10, "middle": sum(loss[mid - 5:mid + 5]) / 10,
            "final": sum(loss[-10:]) / 10}
    assert seen["steps"] == PINNED_LOSS["steps"]
    for key in ("first", "middle", "final"):
        assert abs(seen[key] - PINNED_LOSS[key]) <= 0.03 * PINNED_LOSS[key], (key, seen, PINNED_LOSS)
