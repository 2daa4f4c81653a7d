import json

import pytest

from stages import generation, params as P
from stages.recipes.assistant import evaluate
from stages.errors import StageError
from tests.conftest import ROOT

ROWS = [
    {"kind": "trained", "prompt": "你是谁", "base": "我是一个模型", "tuned": "我是青衫的小助手小浦"},
    {"kind": "trained", "prompt": "Who are you?", "base": "xyz", "tuned": "I am XiaoPu"},
    {"kind": "heldout", "prompt": "名字?", "base": "小浦", "tuned": "小浦，青衫做的"},
    {"kind": "general", "prompt": "1+1?", "base": "2", "tuned": "我是小浦，答案是2"},
    {"kind": "general", "prompt": "sky?", "base": "blue", "tuned": "blue"},
]


def test_identity_metrics_on_known_answers():
    tuned = evaluate.score(ROWS, "tuned", "小浦", "青衫")
    assert tuned == {"identity_hit_rate_trained": 0.5, "identity_hit_rate_heldout": 1.0,
                     "general_identity_leak": 0.5}
    base = evaluate.score(ROWS, "base", "小浦", "青衫")
    assert base == {"identity_hit_rate_trained": 0.0, "identity_hit_rate_heldout": 0.0,
                    "general_identity_leak": 0.0}


def test_names_are_matched_case_insensitively():
    assert evaluate.names_identity("I am TUNA by ada", "Tuna", "Ada")
    assert not evaluate.names_identity("I am Tuna", "Tuna", "Ada")
    assert evaluate.mentions_identity("ada says hi", "Tuna", "Ada")


def test_prompts_of_three_kinds():
    p = P.load(ROOT / "params.yaml")
    prompts = evaluate.load_prompts(p)
    kinds = [k for k, _ in prompts]
    assert kinds.count("trained") == 3 and kinds.count("heldout") == 14 and kinds.count("general") == 14
    trained_questions = json.loads((ROOT / "data/raw/assistant/self_cognition.json").read_text(encoding="utf-8"))["questions"]
    assert not {q for k, q in prompts if k == "heldout"} & set(trained_questions)


def test_bad_heldout_prompts_file(tmp_path):
    from dataclasses import replace

    p = P.load(ROOT / "params.yaml")
    bad = tmp_path / "prompts.json"
    bad.write_text('{"identity_heldout": ["a"], "general": []}', encoding="utf-8")
    with pytest.raises(StageError, match="general: expected a non-empty list"):
        evaluate.load_prompts(replace(p, assistant=replace(p.assistant, heldout_prompts=str(bad))))


def test_backend_choice():
    assert generation.pick_backend("transformers", cuda=True, lmdeploy_python=True) == "transformers"
    assert generation.pick_backend("auto", cuda=False, lmdeploy_python=True) == "transformers"
    assert generation.pick_backend("auto", cuda=True, lmdeploy_python=False) == "transformers"
    assert generation.pick_backend("auto", cuda=True, lmdeploy_python=True) == "lmdeploy"


def test_lmdeploy_without_its_environment_is_one_line(monkeypatch, tmp_path):
    monkeypatch.delenv("LMDEPLOY_PYTHON", raising=False)
    p = P.load(ROOT / "params.yaml")
    with pytest.raises(StageError, match="eval.backend: lmdeploy needs its own environment"):
        generation.lmdeploy_answers([ROOT / "models/merged"], ["hi"], p)
    monkeypatch.setenv("LMDEPLOY_PYTHON", str(tmp_path / "nowhere/python"))
    with pytest.raises(StageError, match=r"^eval.backend: lmdeploy: LMDEPLOY_PYTHON=.*nowhere/python cannot run "
                                         r"\(No such file or directory\)$"):
        generation.lmdeploy_answers([ROOT / "models/merged"], ["hi"], p)


@pytest.mark.parametrize("system", ["", "You are XiaoPu."])
def test_lmdeploy_prompt_is_the_tokenizers_chat_template(built, system):
    """LMDeploy gets XTuner's internlm2_chat template spelled out (its own `internlm2` is gone from
    recent releases); laid out as LMDeploy's BaseChatTemplate lays out one user turn, it must be the
    prompt the transformers backend builds from the tokenizer's chat template."""
    from transformers import AutoTokenizer

    t = generation.lmdeploy_template(system)
    lmdeploy_prompt = t["system"] + t["meta_instruction"] + t["eosys"] + t["user"] + "你是谁" + t["eoh"] + t["assistant"]
    tok = AutoTokenizer.from_pretrained(built / "models/assistant/llm", trust_remote_code=True)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "你是谁"}]
    assert tok.bos_token + lmdeploy_prompt == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert t["stop_words"] == ["<|im_end|>"]


def test_stage_outputs_hold_real_numbers(built):
    rows = [json.loads(line) for line in (built / "reports/eval/generations.jsonl").read_text().splitlines()]
    assert len(rows) == 31 and all(set(r) == {"prompt", "kind", "base", "tuned"} for r in rows)
    metrics = json.loads((built / "reports/eval/metrics.json").read_text())
    for side in ("base", "tuned"):
        m = metrics[side]
        assert m["perplexity_general"] > 1 and m["generation_tokens_per_sec"] > 0
        assert 0 <= m["identity_hit_rate_heldout"] <= 1
    # the base model was never told who it is
    assert metrics["base"]["identity_hit_rate_trained"] == 0.0
    # the fine-tune learned its identity on prompts it was trained on
    assert metrics["tuned"]["identity_hit_rate_trained"] > 0


def test_report_has_every_section_and_a_png(built):
    text = (built / "reports/report.md").read_text(encoding="utf-8")
    for heading in ("## Params", "## Data", "## Training", "## Evaluation", "### Answers: heldout prompts",
                    "## Stages"):
        assert heading in text
    assert "![training loss](loss.png)" in text and "| train |" in text
    assert (built / "reports/loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    numbers = json.loads((built / "reports/metrics.json").read_text())
    assert numbers["final_loss"] > 0 and numbers["tokens_per_sec"] > 0
    assert numbers["perplexity_general_tuned"] > 1


def test_markdown_cells_are_escaped():
    from stages.reporting import cell

    assert cell("a|b\nc") == "a\\|b ⏎ c"
    assert len(cell("x" * 500)) == 160


def test_a_tokenizer_without_chat_template_is_prompted_with_train_prompt_template(built, tmp_path):
    """Where the tokenizer has no chat template, evaluation speaks XTuner's `train.prompt_template`, the
    format the model was trained in, not a fixed one."""
    import json
    import shutil

    from stages.generation import TransformersChat

    plain = tmp_path / "plain"
    shutil.copytree(built / "models/assistant/llm", plain)
    cfg = json.loads((plain / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg.pop("chat_template")
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    question = [{"role": "user", "content": "你是谁"}]
    reference = TransformersChat(built / "models/assistant/llm", "cpu", "").encode(question)
    assert TransformersChat(plain, "cpu", "", "internlm2_chat").encode(question) == reference
    assert TransformersChat(plain, "cpu", "", "vicuna").encode(question) != reference
