"""benchmarks/frontier.py: the settings sweep's params edits and its picture (the runs themselves are the real
pipeline, which the e2e tests cover)."""
import json
import shutil

import pytest

from benchmarks import frontier
from tests.conftest import ROOT


def test_a_setting_edits_params_keeping_comments_and_refuses_unknown_keys(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    frontier.set_params(params, {"data.assistant.general_ratio": 0.5, "stand_in.tiny.llm.hidden_size": 128})
    text = params.read_text(encoding="utf-8")
    assert "general_ratio: 0.5" in text and "hidden_size: 128" in text
    assert "# share of general conversations" in text  # the file's comments stay
    before = params.read_text(encoding="utf-8")
    for key in ("train.no_such_key", "no_section.x", "data.assistant.general_ratio.deeper"):
        with pytest.raises(SystemExit, match=f"no params key {key}"):
            frontier.set_params(params, {key: 1})
    assert params.read_text(encoding="utf-8") == before


def test_the_picture_draws_every_run_and_skips_failed_ones(tmp_path):
    def scores(*pairs):
        return [{"step": 0, "general_identity_leak": 0.0, "identity_hit_rate_heldout": 0.0}] + [
            {"step": 25 * (i + 1), "general_identity_leak": leak, "identity_hit_rate_heldout": held}
            for i, (leak, held) in enumerate(pairs)]

    rows = [{"name": "in", "status": "ok", "scores": scores((0.3, 0.8), (0.6, 0.9)), "meets": [25]},
            {"name": "out", "status": "ok", "scores": scores((0.7, 0.2)), "meets": []},
            {"name": "failed", "status": "exit 1", "scores": scores((0.1, 1.0)), "meets": [25]}]
    results = tmp_path / "frontier.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert frontier.meets(rows[0]["scores"][1]) and not frontier.meets(rows[0]["scores"][2])
    out = tmp_path / "frontier.png"
    assert frontier.plot(out, [results], None) == 2  # a failed run's scores are not its own
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert frontier.main(["--plot", str(out), str(results)]) == 0
