import json

import pytest

from stages import repeat
from tests.conftest import assert_one_line_error, run_stage, tree_digest

RECORD = {"id": "7", "image": "images/x.png",
          "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "a"}]}


def test_repeat_n_times_with_unique_ids():
    out = repeat.repeat([RECORD, {**RECORD, "id": "8"}], 3)
    assert len(out) == 6
    assert len({r["id"] for r in out}) == 6
    assert all(r["conversations"] == RECORD["conversations"] for r in out)


def test_stage_repeats_the_shipped_sample(project, capsys):
    code, _ = run_stage(repeat, capsys)
    assert code == 0
    src = json.loads((project / "data/raw/llava/unique_data.json").read_text(encoding="utf-8"))
    out = json.loads((project / "data/generated/llava/repeated_data.json").read_text(encoding="utf-8"))
    assert len(out) == len(src) * 20


def _records(project):
    return json.loads((project / "data/raw/llava/unique_data.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("mutate,words", [
    (lambda rs: rs[2].update(image="images/missing.png"), ["[2] image", "missing.png", "not found"]),
    (lambda rs: rs[1]["conversations"][0].update(value="no image token"), ["[1] conversations", "0 <image>"]),
    (lambda rs: rs[0]["conversations"][0].update(value="<image>\n<image>\ntwice"),
     ["[0] conversations", "2 <image>"]),
    (lambda rs: rs[3]["conversations"][1].update(**{"from": "human"}), ["[3] conversations[1].from"]),
    (lambda rs: rs[4]["conversations"][1].update(value="  "), ["[4] conversations[1].value: empty"]),
    (lambda rs: rs[5].pop("conversations"), ["[5] conversations: missing"]),
    (lambda rs: rs.clear(), ["the dataset is empty"]),
])
def test_bad_llava_source(project, capsys, mutate, words):
    records = _records(project)
    mutate(records)
    (project / "data/raw/llava/unique_data.json").write_text(json.dumps(records), encoding="utf-8")
    raw = tree_digest(project / "data/raw")
    code, err = run_stage(repeat, capsys)
    assert_one_line_error(code, err, "data/raw/llava/unique_data.json", *words)
    assert tree_digest(project / "data/raw") == raw


def test_corrupt_image(project, capsys):
    (project / "data/raw/llava/images/red_circle_on_white.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    code, err = run_stage(repeat, capsys)
    assert_one_line_error(code, err, "red_circle_on_white.png", "does not decode")


def test_not_a_list(project, capsys):
    (project / "data/raw/llava/unique_data.json").write_text('{"id": 1}', encoding="utf-8")
    code, err = run_stage(repeat, capsys)
    assert_one_line_error(code, err, "expected a list of records")
