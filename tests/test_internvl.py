"""The internvl recipe: the stand-in model, XTuner's InternVL dataset on it, the config, the checkpoint check,
and the whole chain with the real `dvc exp run -S recipe=internvl` on a copy of the session's built
(assistant) project."""
import copy
import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from stages import params as P, plan, render
from stages.recipes.internvl import config as internvl_config
from stages.recipes.internvl import model as internvl, steps as internvl_recipe
from stages.errors import StageError
from tests.conftest import ROOT, copy_project, env, ran, recipe_experiment, repro_in_copy

PARAMS = P.validate({**P.read_yaml(ROOT / "params.yaml"), "recipe": "internvl"})  # its lora presets
INTERNVL_STAGES = ["stand_in@tiny", "prepare", "validate", "render", "train", "select", "convert", "merge", "evaluate", "report"]


@pytest.fixture(scope="session")
def internvl_built(built, tmp_path_factory) -> tuple[Path, str]:
    """A copy of the built assistant project, switched to the internvl recipe by an experiment."""
    return recipe_experiment(built, tmp_path_factory.mktemp("internvl") / "project", "internvl")


def load(path: Path):
    from stages.xtuner_api import patch_stack

    patch_stack()  # InternViT's code imports timm, which imports torchvision (its C ops need the fix)
    from transformers import AutoModel, AutoTokenizer

    return (AutoModel.from_pretrained(str(path), trust_remote_code=True, local_files_only=True),
            AutoTokenizer.from_pretrained(str(path), trust_remote_code=True, local_files_only=True))


# ---------------------------------------------------------------------------------------------
# the stand-in


def test_stand_in_is_deterministic_and_has_internvls_interface(built, tmp_path):
    shape, llm = PARAMS.stand_in.internvl, built / "models/assistant/llm"
    internvl.build(shape, llm, tmp_path / "a")
    internvl.build(shape, llm, tmp_path / "b")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert {"config.json", "configuration_internvl_chat.py", "modeling_internvl_chat.py", "model.safetensors",
            "tokenizer.model", "tokenization_internlm2.py"} <= set(files)
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    internvl.build(replace(shape, seed=shape.seed + 1), llm, tmp_path / "c")
    assert (tmp_path / "c" / "model.safetensors").read_bytes() != (tmp_path / "a" / "model.safetensors").read_bytes()
    model, tok = load(tmp_path / "a")
    assert {"vision_model", "mlp1", "language_model"} <= {name for name, _ in model.named_children()}
    assert model.num_image_token == internvl.image_tokens(shape) == 16
    assert [tok.convert_tokens_to_ids(t) for t in internvl.IMAGE_TOKENS] == [2048, 2049, 2050]
    assert model.language_model.get_input_embeddings().weight.shape[0] % 64 == 0  # 4-bit head on CPU
    assert model.config.llm_config.architectures == ["InternLM2ForCausalLM"]  # XTuner's dataset template check
    cfg = json.loads((tmp_path / "a/config.json").read_text())
    assert cfg["auto_map"]["AutoModel"] == "modeling_internvl_chat.InternVLChatModel" and "_name_or_path" not in cfg


@pytest.mark.e2e
def test_xtuner_internvl_dataset_reads_the_stand_in_and_validate_counts_its_tokens(internvl_built):
    """XTuner's own InternVL_V1_5_Dataset on the validated data: the token count validate reported for a
    record is the length of what the dataset feeds the model, image tokens included."""
    from stages.xtuner_api import patch_stack

    patch_stack()
    from xtuner.dataset import InternVL_V1_5_Dataset
    from xtuner.utils import PROMPT_TEMPLATE

    # a copy: XTuner's InternVL dataset rewrites the SYSTEM and INSTRUCTION of the template it is given, and
    # PROMPT_TEMPLATE's are shared by the whole process (each pipeline stage is its own process)
    built = internvl_built[0]
    ds = InternVL_V1_5_Dataset(model_path=str(built / "models/internvl/model"),
                               template=copy.deepcopy(PROMPT_TEMPLATE.internlm2_chat),
                               data_paths=str(built / "data/validated/internvl/train.json"),
                               image_folders=str(built / "data/raw/internvl"), max_length=256)
    item = ds[0]
    assert tuple(item["pixel_values"].shape) == (1, 3, 112, 112)
    assert item["input_ids"].count(2050) == 16  # <IMG_CONTEXT> x 16
    stats = json.loads((built / "reports/data_stats.json").read_text())["internvl"]
    lengths = {len(ds[i]["input_ids"]) for i in range(8)}
    assert stats["tokens"]["min"] == min(lengths) and stats["tokens"]["max"] == max(lengths)


def test_internvl_params_that_cannot_work_are_one_line():
    tiny = PARAMS.stand_in.internvl
    bad = replace(PARAMS, stand_in=replace(PARAMS.stand_in, internvl=replace(tiny, image_size=100)))
    assert P._contradictions(bad) == ["stand_in.tiny.internvl.image_size: 100 is not a multiple of patch_size 14"]
    bad = replace(PARAMS, train=replace(PARAMS.train, warmup_iters=400))
    assert P._contradictions(bad) == ["train.warmup_iters: 400 is not below max_iters 400"]
    bad = replace(PARAMS, train=replace(PARAMS.train, max_iters=None))
    assert P._contradictions(bad) == ["train.max_iters: null (epochs) is the assistant recipe's; the internvl recipe "
                                      "counts iterations: give a number, or auto"]
    bad = replace(PARAMS, data=replace(PARAMS.data, max_length=48))
    assert P._contradictions(bad) == ["data.max_length: 48 leaves no room for text after up to 48 image tokens "
                                      "(stand_in.tiny.internvl)"]


# ---------------------------------------------------------------------------------------------
# config, patches, checkpoint


def test_lora_means_the_same_for_the_internvl_recipe(tmp_path):
    """`dvc exp run -S recipe=internvl -S lora.r=32`: the rank reaches the rendered config, the rest of
    the tutorial's preset (alpha 256, dropout 0.05) stays; an explicit alpha wins over the preset too."""
    from tests.test_render import MACHINES

    raw = {**P.read_yaml(ROOT / "params.yaml"), "recipe": "internvl"}
    p = P.validate({**raw, "lora": {**raw["lora"], "r": 32}})
    cfg = plan.check_config(render.render(p, plan.resolve(p, **MACHINES["cpu"]), tmp_path / "a"))
    assert (cfg.model.llm_lora.r, cfg.model.llm_lora.lora_alpha, cfg.model.llm_lora.lora_dropout) == (32, 256, 0.05)
    p = P.validate({**raw, "lora": {**raw["lora"], "alpha": 16}})
    assert (p.lora.r, p.lora.alpha) == (128, 16)
    assert P.validate({**raw, "recipe": "assistant"}).lora.r == 64


def test_internvl_config_is_the_tutorial_recipe_and_loads(tmp_path):
    from tests.test_render import MACHINES

    path = render.render(PARAMS, plan.resolve(PARAMS, **MACHINES["cpu"]), tmp_path / "config")
    cfg = plan.check_config(path)
    assert cfg.model.type.__name__ == "InternVL_V1_5" and cfg.model.model_path == "models/internvl/model"
    assert (cfg.model.llm_lora.r, cfg.model.llm_lora.lora_alpha, cfg.model.llm_lora.target_modules) == (
        128, 256, ["w1", "w2", "w3", "wo", "wqkv"])  # InternLM2's block linears; not its output head
    assert cfg.model.quantization_llm is True and cfg.model.freeze_visual_encoder and cfg.model.freeze_llm
    assert cfg.llava_dataset.type.__name__ == "InternVL_V1_5_Dataset"
    assert cfg.train_dataloader.sampler.type.__name__ == "LengthGroupedSampler"
    assert cfg.pipeline["recipe"] == "internvl" and cfg.optim_wrapper.type.__name__ == "OptimWrapper"
    from tests.test_render import MACHINES

    gpu = internvl_config.text(PARAMS, plan.resolve(PARAMS, **MACHINES["gpu_bf16"]), tmp_path)
    assert "AmpOptimWrapper" in gpu and "dtype='bfloat16'" in gpu


def test_patch_internvl_makes_xtuners_single_process_rank_work():
    """Without the patch, XTuner's _llm_forward's get_rank() fails outside a process group."""
    code = ("import torch\n"
            "try:\n    torch.distributed.get_rank()\nexcept (ValueError, RuntimeError) as e:\n    print('unpatched:', e)\n"
            "from stages.xtuner_api import patch_internvl\npatch_internvl('float32')\n"
            "import xtuner.model.internvl as m\nprint('patched:', torch.distributed.get_rank(), m.AutoModel._pipeline)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True).stdout
    assert "unpatched: Default process group has not been initialized" in out and "patched: 0 True" in out


@pytest.mark.e2e
def test_internvl_trains_float32_weights_over_a_bf16_model(internvl_built):
    """On a GPU the model is built in bf16; its trainable weights (LoRA, mlp1) must be float32, or the
    AMP wrapper's gradient unscaling fails on bf16 gradients (it did, on the H100)."""
    code = ("from stages.xtuner_api import patch_internvl\npatch_internvl('bfloat16')\n"
            "import torch\nfrom peft import LoraConfig\nfrom xtuner.model import InternVL_V1_5\n"
            "m = InternVL_V1_5('models/internvl/model', freeze_llm=True, freeze_visual_encoder=True,\n"
            "    llm_lora=dict(type=LoraConfig, r=8, lora_alpha=16, lora_dropout=0.0, task_type='CAUSAL_LM'))\n"
            "dtypes = lambda train: sorted({str(p.dtype) for p in m.parameters() if p.requires_grad == train})\n"
            "print(dtypes(True), dtypes(False))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=internvl_built[0], env=env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    trainable, frozen = proc.stdout.strip().splitlines()[-1].split("] [")
    assert trainable == "['torch.float32'" and "torch.bfloat16" in frozen


def test_convert_refuses_a_checkpoint_of_another_recipe(built, tmp_path):
    """The assistant recipe's adapter.pth: convert_to_official would load nothing (strict=False)."""
    with pytest.raises(StageError) as err:
        internvl_recipe.save_adapter(built / "models/adapter.pth", tmp_path / "adapter", {"r": 128})
    message = str(err.value)
    assert "\n" not in message and "not an InternVL QLoRA checkpoint (0 LoRA keys of model.language_model" in message
    assert not (tmp_path / "adapter").exists()


# ---------------------------------------------------------------------------------------------
# end to end


@pytest.mark.e2e
def test_exp_run_internvl_runs_the_recipe_chain(internvl_built):
    project, out = internvl_built
    assert ran(out) == INTERNVL_STAGES
    adapter = json.loads((project / "models/adapter/adapter_config.json").read_text())
    # LoRA A and B on InternLM2's wqkv, wo, w1, w2, w3 in 2 layers (never its output head); mlp1's 6 tensors
    assert (adapter["r"], adapter["lora_tensors"], adapter["mlp1_tensors"]) == (128, 20, 6)
    merged = project / "models/merged"
    assert {"modeling_internvl_chat.py", "configuration_internvl_chat.py", "model.safetensors"} <= \
        {p.name for p in merged.iterdir()}
    assert json.loads((merged / "config.json").read_text())["torch_dtype"] == "bfloat16"  # convert_to_official's
    merge = json.loads((project / "reports/merge.json").read_text())
    # convert_to_official saves the configuration files but none of the modeling code: all three copied
    assert merge["remote_code_copied"] == ["modeling_intern_vit.py", "modeling_internlm2.py", "modeling_internvl_chat.py"]
    assert merge["max_logit_diff"] < merge["tolerance"] and merge["max_logit_change_from_base"] > 1
    assert 0 < merge["max_logit_diff_unrounded"] < merge["tolerance"]  # trained float32 against converted bf16
    assert merge["trained_max_logit_change_from_base"] > 1
    model, _ = load(merged)  # with the remote code the stage copied
    assert type(model).__name__ == "InternVLChatModel"


@pytest.mark.e2e
def test_internvl_fine_tune_learns_the_captions(internvl_built):
    project, _ = internvl_built
    metrics = json.loads((project / "reports/eval/metrics.json").read_text())
    assert metrics["backend"] == "transformers"
    # measured 0.10 -> 0.30: the captions' characters are mostly outside the text the tiny tokenizer is
    # trained on (the text recipe's files), so they are byte pieces, harder to learn in 400 steps
    assert metrics["tuned"]["answer_similarity"] > metrics["base"]["answer_similarity"] + 0.15
    train = json.loads((project / "reports/train/metrics.json").read_text())
    assert train["final_loss"] < train["first_loss"] / 2 and train["iters"] == PARAMS.train.max_iters == 400


@pytest.mark.e2e
def test_internvl_report_shows_the_image_prompt(internvl_built):
    project, _ = internvl_built
    report = (project / "reports/report.md").read_text(encoding="utf-8")
    assert "# Fine-tune report: internvl" in report and "请你根据这张图片，讲一个脑洞大开的梗" in report
    assert "the stand-in: it exercises the plumbing" in report
    images = re.findall(r'<img src="([^"]+)"', report)
    assert len(images) == len(PARAMS.internvl.eval_images)
    assert all((project / "reports" / src).resolve().is_file() for src in images)
    rows = [json.loads(line) for line in (project / "reports/eval/generations.jsonl").read_text().splitlines()]
    assert [Path(r["image"]).name for r in rows] == [Path(i).name for i in PARAMS.internvl.eval_images]
    assert all(r["reference"] and isinstance(r["tuned"], str) for r in rows)
    assert all(r["reference"] in report for r in rows)


@pytest.mark.e2e
def test_internvl_second_repro_runs_nothing(internvl_built, tmp_path):
    out = repro_in_copy(internvl_built[0], tmp_path / "copy")
    assert ran(out) == [] and "Data and pipelines are up to date" in out


def test_lmdeploy_backend_is_one_line_without_lmdeploy(tmp_path, monkeypatch):
    """eval.backend: lmdeploy runs the tutorial's pipeline() in $LMDEPLOY_PYTHON; this machine has none
    (this interpreter lacks lmdeploy): one line naming the backend, the interpreter and the reason."""
    monkeypatch.delenv("LMDEPLOY_PYTHON", raising=False)
    args = (tmp_path, [tmp_path / "a.png"], "请你根据这张图片，讲一个脑洞大开的梗", 8, 0)
    with pytest.raises(StageError, match="eval.backend: lmdeploy needs its own environment: set LMDEPLOY_PYTHON"):
        internvl_recipe.lmdeploy_answers(*args)
    monkeypatch.setenv("LMDEPLOY_PYTHON", sys.executable)
    with pytest.raises(StageError) as err:
        internvl_recipe.lmdeploy_answers(*args)
    assert str(err.value) == f"eval.backend: lmdeploy failed in {sys.executable} (ModuleNotFoundError: No module " \
                             "named 'lmdeploy')"
    assert "ChatTemplateConfig(**req[\"template\"])" in internvl_recipe.LMDEPLOY_SCRIPT
    assert internvl_recipe.LMDEPLOY_TEMPLATE == "internvl2-internlm2"


@pytest.mark.e2e
def test_other_recipes_inputs_rerun_nothing_in_an_internvl_workspace(internvl_built, tmp_path):
    """The assistant's and llava's code, data and params, edited one at a time: nothing to rerun here,
    but for the one stated exception: the LLM stand-in learns from the assistant's text."""
    from tests.test_pipeline import assert_other_recipes_isolated

    project = tmp_path / "internvl"
    copy_project(internvl_built[0], project)
    assert_other_recipes_isolated(project, "internvl", allowed={"stand_in@tiny"})


@pytest.mark.e2e
def test_chat_about_an_image_answers_as_evaluate_did(internvl_built):
    """`python -m stages.chat --image` on the internvl recipe: the merged InternVL model answers each
    evaluated image as the evaluate stage's greedy decoding did, the answer alone on stdout, and `--base`
    as the untuned model did; `--adapter` is one line (XTuner's InternVL adapter is merged by its convert)."""
    project = internvl_built[0]
    budget = str(PARAMS.eval.max_new_tokens)
    rows = [json.loads(line) for line in (project / "reports/eval/generations.jsonl").read_text().splitlines()]
    for row, extra, key in ((rows[0], (), "tuned"), (rows[-1], (), "tuned"), (rows[-1], ("--base",), "base")):
        out = subprocess.run([sys.executable, "-m", "stages.chat", "--image", row["image"], "--prompt", row["prompt"],
                              "--max-new-tokens", budget, *extra], cwd=project, env=env(), capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert out.stdout == row[key] + "\n", (extra, out.stdout, row[key])
    out = subprocess.run([sys.executable, "-m", "stages.chat", "--image", rows[0]["image"], "--prompt", "hi",
                          "--adapter", "models/adapter"], cwd=project, env=env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 1 and out.stdout == "" and out.stderr.count("\n") == 1, out.stderr[-2000:]
    assert out.stderr.startswith("error: --adapter: recipe internvl") and "--base" in out.stderr
