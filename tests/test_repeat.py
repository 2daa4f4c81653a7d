import json

from stages import repeat
from tests.conftest import run_stage

RECORD = {"id": "7", "image": "images/x.png",
          "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "a"}]}


def test_repeat_n_times_with_unique_ids():
    out = repeat.repeat([RECORD, {**RECORD, "id": "8"}], 3)
    assert len(out) == 6
    assert len({r["id"] for r in out}) == 6
    assert all(r["conversations"] == RECORD["conversations"] for r in out)


def test_prepare_stage_repeats_the_shipped_sample(project, capsys):
    from stages import prepare

    text = (project / "params.yaml").read_text(encoding="utf-8")
    (project / "params.yaml").write_text(text.replace("recipe: assistant ", "recipe: llava     "), encoding="utf-8")
    code, _ = run_stage(prepare, capsys)
    assert code == 0
    src = json.loads((project / "data/raw/llava/unique_data.json").read_text(encoding="utf-8"))
    out = json.loads((project / "data/generated/llava/repeated_data.json").read_text(encoding="utf-8"))
    assert len(out) == len(src) * 20
