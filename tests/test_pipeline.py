"""End to end with the real DVC: a clean clone, `dvc repro`, then what reruns when."""
import json

import pytest

from tests.conftest import ran, sh

pytestmark = pytest.mark.e2e

STAGES = ["base", "vision", "internvl", "generate", "repeat", "validate", "pretrain", "render", "train", "convert", "merge",
          "evaluate", "report"]


def test_first_repro_ran_every_stage_and_wrote_outputs(built):
    for path in ("models/tiny-internlm2/model.safetensors", "data/generated/self_cognition.jsonl",
                 "data/generated/llava/repeated_data.json", "data/validated/assistant.jsonl",
                 "data/validated/llava.json", "data/generated/internvl/repeated_data.json",
                 "data/validated/internvl.json", "models/tiny-internvl/modeling_internvl_chat.py",
                 "reports/data_stats.json", "dvc.lock"):
        assert (built / path).is_file(), path
    lock = (built / "dvc.lock").read_text()
    assert all(f"\n  {s}:" in lock for s in STAGES)


def test_second_repro_runs_nothing(project):
    out = sh("dvc", "repro", cwd=project).stdout
    assert ran(out) == [] and "Data and pipelines are up to date" in out
    assert sh("dvc", "status", "--json", cwd=project).stdout.strip() == "{}"


def test_generation_param_reruns_exactly_its_dependents(project):
    path = project / "params.yaml"
    path.write_text(path.read_text(encoding="utf-8").replace("repeat: 12", "repeat: 3"), encoding="utf-8")
    assert set(json.loads(sh("dvc", "status", "--json", cwd=project).stdout)) == {"generate"}
    out = sh("dvc", "repro", "validate", cwd=project).stdout
    assert ran(out) == ["generate", "validate"]
    # the training chain is next in line; the other data stages and render are not
    assert set(json.loads(sh("dvc", "status", "--json", cwd=project).stdout)) == {"train", "report"}
    stats = json.loads((project / "reports/data_stats.json").read_text())
    assert stats["assistant"]["records"] == round(36 * 3 / 0.8)
    diff = sh("dvc", "params", "diff", "--json", cwd=project).stdout
    change = json.loads(diff)["params.yaml"]["data.repeat"]
    assert (change["old"], change["new"]) == (12, 3)


def test_llava_param_leaves_the_assistant_data_alone(project):
    path = project / "params.yaml"
    text = path.read_text(encoding="utf-8").replace("repeat: 20", "repeat: 5", 1)  # data.llava's (data.internvl's next)
    path.write_text(text, encoding="utf-8")
    before = (project / "data/validated/assistant.jsonl").read_bytes()
    # validated assistant data unchanged: no retraining; the llava recipe's pretrain stage only rewrites its
    # note (same bytes), the report only refreshes its stage timings
    assert ran(sh("dvc", "repro", cwd=project).stdout) == ["repeat", "validate", "pretrain", "report"]
    assert (project / "data/validated/assistant.jsonl").read_bytes() == before  # same bytes: no retrain


def test_dvc_exp_run_with_set_param(project):
    sh("git", "add", "-A", cwd=project)
    sh("git", "commit", "-q", "--allow-empty", "-m", "baseline", cwd=project)
    out = sh("dvc", "exp", "run", "-S", "data.seed=1", "-n", "seed1", "validate", cwd=project).stdout
    assert ran(out) == ["generate", "validate"]
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=project).stdout)
    assert "seed1" in json.dumps(shown)


def test_bad_param_stops_dvc_repro_with_one_line(project):
    path = project / "params.yaml"
    text = path.read_text(encoding="utf-8").replace("repeat: 12", 'repeat: "12"')
    path.write_text(text, encoding="utf-8")
    proc = sh("dvc", "repro", cwd=project, check=False)
    assert proc.returncode != 0
    assert "error: params.yaml: data.repeat: got '12' (a string), expected an integer" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert path.read_text(encoding="utf-8") == text
