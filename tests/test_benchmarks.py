"""The speed benchmark's report, from the results file of the GPU call it reports, and the plain
tokenizer that lets the peer libraries load a random model without remote code."""
import json
import sys

from benchmarks import speed_report
from tests.conftest import ROOT

RESULTS = ROOT / "benchmarks" / "results" / "speed" / "side-by-side.jsonl"


def test_report_gives_each_run_and_the_stage_against_the_best_peer():
    records = [json.loads(line) for line in RESULTS.read_text().splitlines()]
    lines = speed_report.rows(records)
    stage = next(r for r in records if r["run"].startswith("train stage"))
    best = max((r for r in records if r["run"] == "peer"), key=lambda r: r["tokens_per_s"])
    assert best["lib"] == "unsloth"
    assert lines[-1].startswith(f"{stage['run']}: {stage['tokens_per_s'] / best['tokens_per_s']:.2f}x the best peer")
    assert sum(line.startswith("| Unsloth") for line in lines) == 2
    assert sum(line.startswith("| train stage") for line in lines) == 2


def test_plain_tokenizer_has_one_token_per_id():
    sys.path.insert(0, str(ROOT / "scripts"))
    import random_model

    tok = random_model.plain_tokenizer(50)
    assert len(tok) == 50 and tok("t4 t49").input_ids == [4, 49] and tok.eos_token_id == 2
