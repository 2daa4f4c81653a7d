"""The llava recipe: the tiny CLIP stage, its config, the pretrained_pth check, and the whole chain with
the real `dvc exp run -S recipe=llava` on a copy of the session's built (assistant) project."""
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from stages import params as P, plan, render
from stages.recipes.llava import config as llava_config
from stages.recipes.llava import model as llava, vision
from stages.errors import StageError
from tests.conftest import (ROOT, assert_one_line_error, copy_project, env, ran, recipe_experiment, repro_in_copy,
                            run_stage, sh, tree_digest)

GOLDEN = ROOT / "tests" / "golden"
PARAMS = P.validate({**P.read_yaml(ROOT / "params.yaml"), "recipe": "llava"})  # its lora presets
LLAVA_STAGES = ["stand_in@tiny", "prepare", "validate", "render", "train", "select", "convert", "merge", "evaluate", "report"]


@pytest.fixture(scope="session")
def llava_built(built, tmp_path_factory) -> tuple[Path, str]:
    """A copy of the built assistant project, switched to the llava recipe by an experiment."""
    return recipe_experiment(built, tmp_path_factory.mktemp("llava") / "project", "llava")


# ---------------------------------------------------------------------------------------------
# vision encoder


def test_tiny_clip_build_is_deterministic(tmp_path):
    shape = PARAMS.stand_in.llava
    a, b = vision.build(shape, tmp_path / "a"), vision.build(shape, tmp_path / "b")
    assert a["image_tokens"] == (shape.image_size // shape.patch_size) ** 2
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["config.json", "model.safetensors", "preprocessor_config.json"]
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    vision.build(replace(shape, seed=shape.seed + 1), tmp_path / "c")
    assert (tmp_path / "c" / "model.safetensors").read_bytes() != (tmp_path / "a" / "model.safetensors").read_bytes()
    from transformers import CLIPImageProcessor, CLIPVisionModel

    model = CLIPVisionModel.from_pretrained(tmp_path / "a")
    assert model.config.hidden_size == shape.hidden_size
    assert CLIPImageProcessor.from_pretrained(tmp_path / "a").crop_size["height"] == shape.image_size


def test_vision_params_that_cannot_work_are_one_line():
    bad = replace(PARAMS, stand_in=replace(PARAMS.stand_in, llava=replace(PARAMS.stand_in.llava, image_size=100)))
    assert "stand_in.tiny.llava.image_size: 100 is not a multiple of patch_size 14" in P._contradictions(bad)[0]
    bad = replace(PARAMS, train=replace(PARAMS.train, max_iters=5))
    assert P._contradictions(bad) == ["train.warmup_iters: 5 is not below max_iters 5"]
    bad = replace(PARAMS, llava=replace(PARAMS.llava, pretrain=replace(PARAMS.llava.pretrain, max_iters=5)))
    assert P._contradictions(bad) == ["llava.pretrain.warmup_iters: 5 is not below max_iters 5"]


@pytest.mark.e2e
def test_validate_counts_image_tokens_in_llava_lengths(llava_built):
    stats = json.loads((llava_built[0] / "reports/data_stats.json").read_text())["llava"]
    assert stats["image_tokens"] == 64 and 64 < stats["tokens"]["min"] <= stats["tokens"]["max"] <= 256


# ---------------------------------------------------------------------------------------------
# config


@pytest.fixture
def stand_in_vision(monkeypatch):
    """The image tokens of the stand-in CLIP (stand_in.tiny.llava), without building it: rendering reads
    them from models/llava/vision/config.json."""
    monkeypatch.setattr(vision, "encoder_image_tokens", lambda p: vision.image_tokens(p.stand_in.llava))


@pytest.mark.parametrize("machine", ["cpu", "gpu_bf16"])
def test_llava_template_renders_the_golden_file(machine, stand_in_vision):
    from tests.test_render import MACHINES

    text = llava_config.text(PARAMS, plan.resolve(PARAMS, **MACHINES[machine]))
    golden = GOLDEN / f"llava_{machine}.py"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text, encoding="utf-8")
    assert text == golden.read_text(encoding="utf-8")


def test_llava_resolves_on_a_gpu_host_with_the_model_shape(llava_project):
    """The projector phase and render resolve through one function, which reads the model's shape: on a
    GPU the memory planner needs it (the projector phase once resolved without it and failed there)."""
    p = replace(PARAMS, train=replace(PARAMS.train, micro_batch=4, global_batch=16))
    r = plan.resolve_here(p, dict(cuda=True, bf16=True, card_gb=80.0))
    assert (r["device"], r["precision"], r["micro_batch"], r["grad_accum"]) == ("cuda", "bf16", 4, 4)
    assert r["memory_gb"] == 72.0 and r["checkpointing"] is False and r["fused_loss"] is False


def test_llava_config_is_the_xtuner_recipe_and_loads(tmp_path, stand_in_vision):
    p = replace(PARAMS, train=replace(PARAMS.train, micro_batch=2, global_batch=8))
    path = render.render(p, plan.resolve(p, cuda=False, bf16=False), tmp_path / "config")
    cfg = plan.check_config(path)
    assert cfg.model.type.__name__ == "LLaVAModel" and cfg.model.pretrained_pth == "models/pretrain/projector.pth"
    assert cfg.model.llm_lora.r == p.lora.r and cfg.model.visual_encoder_lora.r == p.llava.visual_lora.r
    assert cfg.model.llm.quantization_config.bnb_4bit_quant_type == "nf4"
    assert cfg.train_dataloader.sampler.type.__name__ == "LengthGroupedSampler"
    assert (cfg.train_dataloader.batch_size, cfg.optim_wrapper.accumulative_counts) == (2, 4)  # global batch 8
    assert cfg.max_length == p.data.max_length - 64 and cfg.pipeline["recipe"] == "llava"
    pre = plan.render_text(llava_config.TEMPLATE, llava_config.llava_context(p, plan.llava_batch(p, plan.resolve(
        p, cuda=False, bf16=False)), "pretrain"))
    assert "llm_lora" not in pre and "pretrained_pth" not in pre and "DefaultSampler" in pre


# ---------------------------------------------------------------------------------------------
# pretrained_pth


def _models(project: Path) -> tuple[Path, Path]:
    return project / "models/llava/llm", project / "models/llava/vision"


@pytest.fixture
def llava_project(llava_built, tmp_path, monkeypatch) -> Path:
    """A private copy of the built llava workspace, made the working directory."""
    dest = tmp_path / "llava"
    copy_project(llava_built[0], dest)
    monkeypatch.chdir(dest)
    return dest


def test_pretrained_pth_that_fits_loads(llava_built, tmp_path):
    import torch

    llm, vit = _models(llava_built[0])
    expected = llava.expected_projector_from_dirs(llm, vit)
    assert expected["projector.model.0.weight"] == (64, 64) and len(expected) == 4
    path = tmp_path / "good.pth"
    torch.save({"state_dict": {k: torch.zeros(v) for k, v in expected.items()}}, path)
    assert sorted(llava.check_pretrained_pth(path, llm, vit)) == sorted(expected)


def test_pretrained_pth_of_another_run_is_one_line(built, llava_built):
    """The text recipe's adapter.pth: XTuner would load nothing and keep a random projector."""
    llm, vit = _models(llava_built[0])
    with pytest.raises(StageError) as err:
        llava.check_pretrained_pth(built / "models/adapter.pth", llm, vit)
    message = str(err.value)
    assert "\n" not in message and message.startswith("llava.pretrained_pth: ")
    assert "0 of 4 projector keys would load" in message and "4 missing (projector.model.0.bias" in message
    assert "unexpected (llm.base_model.model" in message


def test_pretrained_pth_with_wrong_shapes_is_one_line(llava_built, tmp_path):
    """A projector made for another vision encoder (32 wide): XTuner fails deep in model building."""
    import torch

    llm, vit = _models(llava_built[0])
    path = tmp_path / "wrong.pth"
    torch.save({"state_dict": {k: torch.zeros(v) for k, v in llava.expected_projector(32, 64).items()}}, path)
    with pytest.raises(StageError, match=r"1 with another shape \(projector.model.0.weight: \[64, 32\] vs "
                                         r"\[64, 64\]\)"):
        llava.check_pretrained_pth(path, llm, vit)
    with pytest.raises(StageError, match="not found"):
        llava.check_pretrained_pth(tmp_path / "nothing.pth", llm, vit)


def use_pretrained_pth(project: Path, name: str) -> None:
    path = project / "params.yaml"
    path.write_text(path.read_text(encoding="utf-8").replace(
        "  pretrained_pth:     ", f"  pretrained_pth: models/llava/{name}"), encoding="utf-8")


def test_train_stage_refuses_a_wrong_pretrained_pth(built, llava_project, capsys, monkeypatch):
    from stages import train

    shutil.copy(built / "models/adapter.pth", llava_project / "models/llava/other.pth")
    use_pretrained_pth(llava_project, "other.pth")
    assert P.load(llava_project / "params.yaml").llava.pretrained_pth == "models/llava/other.pth"
    monkeypatch.setenv("PYTHONHASHSEED", "0")  # else the stage re-executes itself with it
    code, err = run_stage(train, capsys)
    assert_one_line_error(code, err, "llava.pretrained_pth: models/llava/other.pth does not fit", "4 missing")


def test_projector_phase_takes_a_pretrained_pth_that_fits(llava_project):
    """The tutorial's way: a projector from someone's pretrain run; no pretraining here."""
    import torch

    from stages.paths import PRETRAIN
    from stages.recipes.llava import pretrain

    expected = llava.expected_projector_from_dirs(*_models(llava_project))
    torch.manual_seed(0)
    torch.save({"state": "mmengine checkpoints hold more", "state_dict": {k: torch.randn(v) for k, v in expected.items()}},
               llava_project / "models/llava/iter_2181.pth")
    use_pretrained_pth(llava_project, "iter_2181.pth")
    summary = pretrain.prepare(P.load(), PRETRAIN)
    assert summary["projector_from"] == "models/llava/iter_2181.pth" and "pretrain_iters" not in summary
    saved = torch.load(llava_project / "models/pretrain/projector.pth", weights_only=True)["state_dict"]
    original = torch.load(llava_project / "models/llava/iter_2181.pth", weights_only=True)["state_dict"]
    assert sorted(saved) == sorted(expected) and all(torch.equal(saved[k], original[k]) for k in saved)
    assert not (llava_project / "models/pretrain/pretrain_config.py").exists()


def test_train_stage_refuses_a_pretrained_pth_that_would_run_code(llava_project, capsys, monkeypatch, tmp_path):
    """A crafted iter_2181.pth: one line naming the param, the file and what its pickle would call; the
    payload never runs and the stage writes nothing."""
    from stages import train
    from tests.test_xtuner_api import crafted_pth

    marker = tmp_path / "ran"
    crafted_pth(llava_project / "models/llava/iter_2181.pth", marker)
    use_pretrained_pth(llava_project, "iter_2181.pth")
    before = tree_digest(llava_project / "models/pretrain")
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    code, err = run_stage(train, capsys)
    assert_one_line_error(code, err, "llava.pretrained_pth: models/llava/iter_2181.pth: refused: its pickle would "
                                     "call builtins.exec")
    assert not marker.exists()
    assert tree_digest(llava_project / "models/pretrain") == before


# ---------------------------------------------------------------------------------------------
# end to end


@pytest.mark.e2e
def test_exp_run_llava_runs_the_recipe_chain(llava_built):
    project, out = llava_built
    assert ran(out) == LLAVA_STAGES
    assert sorted(p.name for p in (project / "models/adapter").iterdir() if p.is_dir()) == \
        ["llm_adapter", "projector", "visual_encoder_adapter"]
    assert sorted(p.name for p in (project / "models/merged").iterdir()) == ["llm", "projector", "visual_encoder"]
    summary = json.loads((project / "models/pretrain/summary.json").read_text())
    assert summary["projector_from"] == "pretrain" and summary["samples"] == 160
    merge = json.loads((project / "reports/merge.json").read_text())
    assert 0 < merge["max_logit_diff"] < merge["tolerance"] == 0.05
    cfg = (project / "models/config/xtuner_config.py").read_text()
    assert "LengthGroupedSampler" in cfg and "visual_encoder_lora=dict(" in cfg


@pytest.mark.e2e
def test_llava_fine_tune_learns_the_images(llava_built):
    project, _ = llava_built
    metrics = json.loads((project / "reports/eval/metrics.json").read_text())
    assert metrics["tuned"]["answer_similarity"] > metrics["base"]["answer_similarity"] + 0.3
    train = json.loads((project / "reports/train/metrics.json").read_text())
    assert train["final_loss"] < train["first_loss"]
    # tokens/s from the iteration time: micro-batch 1 x the mean sample, its 64 image tokens counted
    mean = json.loads((project / "models/pretrain/summary.json").read_text())["mean_tokens"]
    stats = json.loads((project / "reports/data_stats.json").read_text())["llava"]["tokens"]
    assert stats["min"] <= mean <= stats["max"] and train["tokens_per_sec"] > 0


@pytest.mark.e2e
def test_llava_report_shows_images_and_answers(llava_built):
    project, _ = llava_built
    report = (project / "reports/report.md").read_text(encoding="utf-8")
    assert "# Fine-tune report: llava" in report and "## Evaluation: image prompts" in report
    images = re.findall(r'<img src="([^"]+)"', report)
    assert len(images) == len(PARAMS.llava.eval_images)
    assert all((project / "reports" / src).resolve().is_file() for src in images)
    assert "| before fine-tuning | after fine-tuning |" in report
    rows = [json.loads(line) for line in (project / "reports/eval/generations.jsonl").read_text().splitlines()]
    assert all(r["kind"] == "image" and r["base"] is not None and r["tuned"] for r in rows)
    numbers = json.loads((project / "reports/metrics.json").read_text())
    assert {"answer_similarity_tuned", "merge_max_logit_diff", "final_loss"} <= set(numbers)


@pytest.mark.e2e
def test_llava_second_repro_runs_nothing(llava_built, tmp_path):
    out = repro_in_copy(llava_built[0], tmp_path / "copy")
    assert ran(out) == [] and "Data and pipelines are up to date" in out


@pytest.mark.e2e
def test_compare_names_the_image_of_each_answer(llava_built, tmp_path):
    project, _ = llava_built
    out = tmp_path / "compare"
    sh("python", "-m", "stages.compare", "llava", "workspace", "--out", str(out), cwd=project)
    text = (out / "compare.md").read_text(encoding="utf-8")
    for image in PARAMS.llava.eval_images:
        assert f"[{Path(image).name}] |" in text, image


@pytest.mark.e2e
def test_other_recipes_inputs_rerun_nothing_in_a_llava_workspace(llava_built, tmp_path):
    """The assistant's and internvl's code, data and params, edited one at a time: nothing to rerun here,
    but for the one stated exception: the LLM stand-in learns from the assistant's text."""
    from tests.test_pipeline import assert_other_recipes_isolated

    project = tmp_path / "llava"
    copy_project(llava_built[0], project)
    assert_other_recipes_isolated(project, "llava", allowed={"stand_in@tiny"})


def test_chat_about_an_image_answers_as_evaluate_did(llava_built):
    """`python -m stages.chat --image`: the merged LLaVA model (and the adapter on the base) answers each
    evaluated image as the evaluate stage's greedy decoding did, the answer alone on stdout."""
    project = llava_built[0]
    budget = str(yaml.safe_load((project / "params.yaml").read_text())["eval"]["max_new_tokens"])
    rows = [json.loads(line) for line in (project / "reports/eval/generations.jsonl").read_text().splitlines()]
    for row, extra in ((rows[0], ()), (rows[-1], ("--adapter", "models/adapter"))):
        out = subprocess.run([sys.executable, "-m", "stages.chat", "--image", row["image"], "--prompt", row["prompt"],
                              "--max-new-tokens", budget, *extra], cwd=project, env=env(), capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert out.stdout == row["tuned"] + "\n", (extra, out.stdout, row["tuned"])
