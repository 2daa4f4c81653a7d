import json
import shutil

import pytest

from stages import dataset, validate
from stages.xtuner_api import prompt_template
from tests.conftest import assert_one_line_error, run_stage, tree_digest

CONV = {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]}


def test_token_lengths_follow_xtuner_template(built):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built / "models/assistant/llm", trust_remote_code=True)
    template = prompt_template("internlm2_chat")
    pieces = dataset.openai_pieces(CONV, template)
    assert pieces == ["<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n", "你好！<|im_end|>"]
    (n,) = dataset.token_lengths([CONV], dataset.openai_pieces, tok, template)
    assert n == 1 + sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in pieces)
    with_system = {"messages": [{"role": "system", "content": "be brief"}] + CONV["messages"] * 2}
    pieces = dataset.openai_pieces(with_system, template)
    assert len(pieces) == 4 and pieces[0].startswith("<|im_start|>system\nbe brief<|im_end|>\n")
    assert pieces[1].endswith("<|im_end|>\n") and not pieces[3].endswith("\n")


def test_stats_and_helpers():
    assert dataset.duplicate_rate([CONV, CONV, {"messages": []}, CONV]) == 0.5
    assert dataset.duplicate_rate([{"id": 1, "x": 1}, {"id": 2, "x": 1}], ignore=("id",)) == 0.5
    assert dataset.length_stats([1, 2, 3, 4, 100]) == {"min": 1, "mean": 22.0, "p50": 3, "p95": 100,
                                                        "max": 100}


def test_stage_writes_validated_data_and_metrics(built):
    stats = json.loads((built / "reports/data_stats.json").read_text())
    assert set(stats) == {"max_length", "assistant"}  # the selected recipe's data alone
    assert stats["assistant"]["records"] == stats["assistant"]["kept"] > 0
    assert 0 < stats["assistant"]["tokens"]["min"] <= stats["assistant"]["tokens"]["max"] <= stats["max_length"]
    assert (built / "data/validated/assistant/train.jsonl").read_bytes() == \
        (built / "data/generated/assistant/self_cognition.jsonl").read_bytes()


def _set_param(project, old, new):
    path = project / "params.yaml"
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new), encoding="utf-8")


def _overlong(project) -> int:
    """One overlong record appended to the prepared data; the number of records before it (its index)."""
    path = project / "data/generated/assistant/self_cognition.jsonl"
    text = path.read_text(encoding="utf-8")
    long = {"messages": [{"role": "user", "content": "长" * 400}, {"role": "assistant", "content": "好"}]}
    path.write_text(text + json.dumps(long, ensure_ascii=False) + "\n", encoding="utf-8")
    return len(text.splitlines())


def test_overlong_records_are_errors_by_default(project, capsys):
    n = _overlong(project)
    code, err = run_stage(validate, capsys)
    assert_one_line_error(code, err, "self_cognition.jsonl: 1 bad record", f"[{n}]", "> data.max_length 256",
                          "data.overlong")


def test_overlong_records_can_be_dropped(project, capsys):
    n = _overlong(project)
    _set_param(project, "overlong: error", "overlong: drop")
    assert run_stage(validate, capsys)[0] == 0
    stats = json.loads((project / "reports/data_stats.json").read_text())["assistant"]
    assert (stats["records"], stats["kept"], stats["dropped"], stats["over_max_length"]) == (n + 1, n, 1, 1)


def test_overlong_records_can_be_left_to_xtuner(project, capsys):
    n = _overlong(project)
    _set_param(project, "overlong: error", "overlong: truncate")
    assert run_stage(validate, capsys)[0] == 0
    assert json.loads((project / "reports/data_stats.json").read_text())["assistant"]["kept"] == n + 1


@pytest.mark.parametrize("content,words", [
    ("", ["the dataset is empty"]),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', ["[0] messages", "at least 2"]),
    ('{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}\n',
     ["[0] messages[0].role", "'robot' is not one of system, user, assistant"]),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}, '
     '{"role": "user", "content": "more"}]}\n', ["[0] messages", "ends with a user turn"]),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, '
     '{"role": "assistant", "content": "c"}]}\n', ["[0] messages[1].role", "system is only allowed"]),
    ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}\n',
     ["[0] messages[0].content", "expected string"]),
    ('{"instruction": "hi", "output": "x"}\n', ["[0] messages: missing"]),
    ('[1, 2]\n', ["[0]", "expected object"]),
    ('{"messages": [}\n', ["line 1", "not valid JSON"]),
])
def test_bad_conversations(project, capsys, content, words):
    (project / "data/generated/assistant/self_cognition.jsonl").write_text(content, encoding="utf-8")
    raw, validated = tree_digest(project / "data/raw"), tree_digest(project / "data/validated")
    code, err = run_stage(validate, capsys)
    assert_one_line_error(code, err, "data/generated/assistant/self_cognition.jsonl", *words)
    assert tree_digest(project / "data/raw") == raw
    assert tree_digest(project / "data/validated") == validated  # bad data never replaces good


def test_many_bad_records_are_listed_with_a_count(project, capsys):
    bad = '{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}\n'
    (project / "data/generated/assistant/self_cognition.jsonl").write_text(bad * 7, encoding="utf-8")
    code, err = run_stage(validate, capsys)
    assert_one_line_error(code, err, "7 bad records", "[0]", "[1]", "[2]", "and 4 more")


def test_image_missing_from_the_repeated_data(project, capsys):
    from stages import prepare

    text = (project / "params.yaml").read_text(encoding="utf-8")
    (project / "params.yaml").write_text(text.replace("recipe: assistant ", "recipe: llava     "), encoding="utf-8")
    assert run_stage(prepare, capsys)[0] == 0
    (project / "data/raw/llava/images/red_circle_on_white.png").unlink()
    code, err = run_stage(validate, capsys)
    assert_one_line_error(code, err, "repeated_data.json", "red_circle_on_white.png", "not found")


def test_generated_data_missing(project, capsys):
    shutil.rmtree(project / "data/generated")
    code, err = run_stage(validate, capsys)
    assert_one_line_error(code, err, "self_cognition.jsonl: not found", "dvc repro prepare")
