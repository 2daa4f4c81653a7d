"""End to end with the real DVC: a clean clone, `dvc repro`, then what reruns when."""
import json

import pytest

from tests.conftest import compile_stages, ran, sh

pytestmark = pytest.mark.e2e

STAGES = ["stand_in@tiny", "prepare", "validate", "render", "train", "select", "convert", "merge", "evaluate", "report"]


def test_first_repro_ran_every_stage_and_wrote_outputs(built):
    for path in ("models/assistant/llm/model.safetensors", "data/generated/assistant/self_cognition.jsonl",
                 "data/validated/assistant/train.jsonl", "reports/data_stats.json", "dvc.lock"):
        assert (built / path).is_file(), path
    lock = (built / "dvc.lock").read_text()
    assert all(f"\n  {s}:" in lock for s in STAGES)
    # a run builds only what it reads: no other recipe's models or data
    for other in ("models/llava", "models/internvl", "data/generated/llava", "data/validated/internvl"):
        assert not (built / other).exists(), other
    assert set(json.loads((built / "reports/data_stats.json").read_text())) == {"max_length", "assistant"}


# Inputs of the recipes that a workspace did not select: an edit to any of them reruns nothing there.
OTHER_RECIPE_EDITS = {
    "llava": [("data/raw/llava/unique_data.json", None), ("stages/recipes/llava/model.py", None),
              ("params.yaml", ("repeat: 20", "repeat: 5")), ("params.yaml", ("lr: 0.005", "lr: 0.006")),
              ("params.yaml", ("image_size: 112          # 112 / 14 = 8", "image_size: 98           # 112 / 14 = 8"))],
    "internvl": [("data/raw/internvl/unique_data.json", None), ("stages/recipes/internvl/steps.py", None),
                 ("stages/recipes/internvl/remote_code/modeling_internvl_chat.py", None),
                 ("params.yaml", ("eval_prompt: 请你根据这张图片，讲一个脑洞大开的梗", "eval_prompt: 讲个梗")),
                 ("params.yaml", ("max_dynamic_patch: 2", "max_dynamic_patch: 3"))],
    "assistant": [("data/raw/assistant/self_cognition.json", None), ("stages/recipes/assistant/generate.py", None),
                  ("params.yaml", ("repeat: 12", "repeat: 3")), ("params.yaml", ("- 你是谁\n", "- 你是谁呀\n")),
                  ("params.yaml", ("merge_tolerance: 1.0e-3", "merge_tolerance: 2.0e-3"))],
}


def edit_input(project, file: str, change) -> None:
    path = project / file
    text = path.read_text(encoding="utf-8")
    if change is None:  # data: one more space inside the JSON; code: one more comment line
        text = text.replace("[", "[ ", 1) if file.endswith(".json") else text + "\n# edited\n"
    else:
        assert change[0] in text, (file, change[0])
        text = text.replace(change[0], change[1], 1)
    path.write_text(text, encoding="utf-8")


def assert_other_recipes_isolated(project, selected: str, allowed: set = frozenset()) -> None:
    """Each edit to another recipe's data, code or params, one at a time: `dvc status` reports no stage
    (but `allowed` for an edit of the assistant's text, which the LLM stand-in learns from), and
    `git checkout` undoes it."""
    sh("git", "add", "-A", cwd=project)
    sh("git", "commit", "-q", "--allow-empty", "-m", "isolation baseline", cwd=project)
    for other, edits in OTHER_RECIPE_EDITS.items():
        if other == selected:
            continue
        for file, change in edits:
            edit_input(project, file, change)
            changed = set(json.loads(sh("dvc", "status", "--json", cwd=project).stdout))
            exempt = set(allowed) if file.startswith("data/raw/assistant/") else set()
            assert changed <= exempt, f"{selected} workspace, {other}'s {file} {change}: {sorted(changed)}"
            sh("git", "checkout", "-q", "--", file, cwd=project)


def test_other_recipes_inputs_rerun_nothing(project):
    assert_other_recipes_isolated(project, "assistant")


def test_second_repro_runs_nothing(project):
    out = sh("dvc", "repro", cwd=project).stdout
    assert ran(out) == [] and "Data and pipelines are up to date" in out
    assert sh("dvc", "status", "--json", cwd=project).stdout.strip() == "{}"
    # Where Python writes bytecode (the usual setting, and this suite's: tests/conftest.py), the stages
    # leave __pycache__ folders in stages/, whose folders several stages depend on: DVC must not see a change
    # there (.dvcignore), or the next `dvc repro` reruns the pipeline. compileall writes what Python writes.
    compile_stages(project)
    assert any(project.glob("stages/recipes/assistant/__pycache__/*.pyc"))
    assert sh("dvc", "status", "--json", cwd=project).stdout.strip() == "{}"


def test_generation_param_reruns_exactly_its_dependents(project):
    path = project / "params.yaml"
    path.write_text(path.read_text(encoding="utf-8").replace("repeat: 12", "repeat: 3"), encoding="utf-8")
    # prepare, and the stages that read any of data.assistant (validate, evaluate and report: the files, the
    # name and author; render, train, merge: the image recipes' image_folder, one params entry
    # data.${recipe} for all): never the stand-in
    assert set(json.loads(sh("dvc", "status", "--json", cwd=project).stdout)) == {
        "prepare", "validate", "render", "train", "select", "merge", "evaluate", "report"}
    out = sh("dvc", "repro", "validate", cwd=project).stdout
    assert ran(out) == ["prepare", "validate"]
    # the model and the config are untouched: no stand-in, and render's output would be the same bytes
    out = sh("dvc", "repro", "render", cwd=project).stdout
    assert ran(out) == ["render"] and "stand_in@tiny" not in json.loads(
        sh("dvc", "status", "--json", cwd=project).stdout)
    stats = json.loads((project / "reports/data_stats.json").read_text())
    assert stats["assistant"]["records"] == round(36 * 3 / (1 - 0.35))  # general_ratio 0.35
    diff = sh("dvc", "params", "diff", "--json", cwd=project).stdout
    change = json.loads(diff)["params.yaml"]["data.assistant.repeat"]
    assert (change["old"], change["new"]) == (12, 3)


def test_dvc_exp_run_with_set_param(project):
    sh("git", "add", "-A", cwd=project)
    sh("git", "commit", "-q", "--allow-empty", "-m", "baseline", cwd=project)
    out = sh("dvc", "exp", "run", "-S", "data.assistant.seed=1", "-n", "seed1", "validate", cwd=project).stdout
    assert ran(out) == ["prepare", "validate"]
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=project).stdout)
    assert "seed1" in json.dumps(shown)


def test_bad_param_stops_dvc_repro_with_one_line(project):
    path = project / "params.yaml"
    text = path.read_text(encoding="utf-8").replace("repeat: 12", 'repeat: "12"')
    path.write_text(text, encoding="utf-8")
    proc = sh("dvc", "repro", cwd=project, check=False)
    assert proc.returncode != 0
    assert "error: params.yaml: data.assistant.repeat: got '12' (a string), expected an integer" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert path.read_text(encoding="utf-8") == text
