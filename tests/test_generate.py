import json
from dataclasses import replace

import pytest

from stages import params as P
from stages.recipes.assistant import generate
from stages.checks import check_openai
from tests.conftest import ROOT, assert_one_line_error, run_stage

DATA = P.load(ROOT / "params.yaml").data.assistant
QUESTIONS = ["你是谁", "Who are you?"]
ANSWERS = ["我是{author}的小助手{name}", "I am {name}, made by {author}."]
GENERAL = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
           for i in range(5)]


def test_counts_language_and_fill():
    data = replace(DATA, repeat=3, general_ratio=0.25, name="Tuna", author="Ada")
    records = generate.generate(QUESTIONS, ANSWERS, GENERAL, data)
    asked = QUESTIONS + [generate.other_form(q) for q in QUESTIONS]
    identity = [r for r in records if r["messages"][0]["content"] in asked]
    assert len(identity) == 6 and len(records) == 8  # 6 identity; 6 * 0.25 / 0.75 = 2 general
    for r in identity:
        q, a = (m["content"] for m in r["messages"])
        assert "Tuna" in a and "Ada" in a
        assert generate.is_chinese(q) == generate.is_chinese(a)
        assert not check_openai(r, "x", 0)


def test_each_question_comes_in_both_written_forms_in_turn():
    records = generate.generate(QUESTIONS, ANSWERS, [], replace(DATA, repeat=4, general_ratio=0.0))
    asked = sorted(r["messages"][0]["content"] for r in records)
    assert asked == sorted(["你是谁", "你是谁？", "Who are you?", "Who are you"] * 2)


@pytest.mark.parametrize("question, other", [("你是谁", "你是谁？"), ("你是谁？", "你是谁"), ("做个自我介绍吧", "做个自我介绍吧。"),
                                             ("Who are you?", "Who are you"), ("What are you", "What are you?"),
                                             ("Tell me about yourself", "Tell me about yourself."), ("嗯！！ ", "嗯")])
def test_other_form_adds_the_missing_mark_or_takes_it_away(question, other):
    assert generate.other_form(question) == other


def test_deterministic_for_a_seed_and_varies_with_it():
    first = generate.generate(QUESTIONS, ANSWERS, GENERAL, replace(DATA, general_ratio=0.5))
    assert first == generate.generate(QUESTIONS, ANSWERS, GENERAL, replace(DATA, general_ratio=0.5))
    assert first != generate.generate(QUESTIONS, ANSWERS, GENERAL, replace(DATA, general_ratio=0.5, seed=1))


def test_general_pool_is_used_evenly_before_repeating():
    records = generate.generate(QUESTIONS, ANSWERS, GENERAL, replace(DATA, repeat=5, general_ratio=0.5))
    general = [r["messages"][0]["content"] for r in records if r in GENERAL]
    assert len(general) == 10 and all(general.count(f"q{i}") == 2 for i in range(5))


def test_no_general_share():
    records = generate.generate(QUESTIONS, ANSWERS, [], replace(DATA, general_ratio=0.0))
    assert len(records) == len(QUESTIONS) * DATA.repeat


def test_shipped_templates_load():
    questions, answers = generate.load_templates(ROOT / "data/raw/assistant/self_cognition.json")
    assert P.load(ROOT / "params.yaml").data.assistant.templates == "data/raw/assistant/self_cognition.json"
    assert questions[:3] == ["请你介绍一下你自己", "你是谁", "你是我的小助手吗"]
    assert all("{name}" in a and "{author}" in a for a in answers)


def test_stage_writes_openai_jsonl(project, capsys):
    from stages import prepare

    code, _ = run_stage(prepare, capsys)
    assert code == 0
    lines = (project / "data/generated/assistant/self_cognition.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    data = P.load().data
    assert len(records) == round(36 * data.assistant.repeat / (1 - data.assistant.general_ratio))
    assert all(not check_openai(r, "x", i) for i, r in enumerate(records))


def test_own_general_chat_file_with_a_mistake(project, capsys):
    from stages import prepare

    own = project / "data/raw/assistant/my_chat.jsonl"
    own.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [{"role": "assistant", "content": "first?"}, {"role": "user", "content": "x"}]}\n',
                   encoding="utf-8")
    text = (project / "params.yaml").read_text(encoding="utf-8")
    (project / "params.yaml").write_text(text.replace("general_chat: data/raw/assistant/general_chat.jsonl",
                                                      "general_chat: data/raw/assistant/my_chat.jsonl"), encoding="utf-8")
    code, err = run_stage(prepare, capsys)
    assert_one_line_error(code, err, "my_chat.jsonl: 1 bad record", "[1] messages[0].role")
