"""Stage select: every checkpoint scored on the evaluate stage's prompts, the rule's choice used by
convert, merge and evaluate; the rule alone reruns from select on; the mixing sweep as a real DVC queue."""
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from stages import params as P
from stages.recipes.assistant.select import choose
from tests.conftest import env, ran, sh

SELECT = P.Select(rule="best", max_leak=0.5, max_perplexity_rise=0.2, during_training="auto")


def row(step, heldout, leak, ppl=100.0, trained=1.0):
    return {"step": step, "identity_hit_rate_trained": trained, "identity_hit_rate_heldout": heldout,
            "general_identity_leak": leak, "perplexity_general": ppl}


def test_best_is_the_highest_heldout_rate_within_the_limits():
    rows = [row(10, 0.4, 0.1), row(20, 0.9, 0.9), row(30, 0.7, 0.5), row(40, 0.7, 0.2), row(50, 0.8, 0.3, ppl=130),
            row(60, 0.7, 0.2)]
    chosen, within = choose(rows, SELECT, base_perplexity=100.0)
    # 20 leaks too much, 50's perplexity rose 30%; of 30, 40 and 60 (0.7) the lower leak, then the earlier
    assert (chosen["step"], within) == (40, True)


def test_last_is_the_last_and_none_within_the_limits_is_said():
    rows = [row(10, 0.4, 0.8), row(20, 0.9, 0.95), row(30, 0.8, 0.6)]
    assert choose(rows, P.Select(rule="last", max_leak=0.5, max_perplexity_rise=0.2, during_training="auto"), 100.0) == (rows[-1], True)
    chosen, within = choose(rows, SELECT, 100.0)
    assert (chosen["step"], within) == (30, False)  # the best held-out rate minus leak



class Block(torch.nn.Module):
    """Two adapted linears and one that is not, named as InternLM2's."""

    def __init__(self):
        super().__init__()
        self.wqkv, self.wo, self.head = torch.nn.Linear(6, 6), torch.nn.Linear(6, 6), torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.wo(self.wqkv(x)))


def lora(model, r, seed):
    g = torch.Generator().manual_seed(seed)
    return {f"base_model.model.{name}.lora_{part}.default.weight": torch.randn(shape, generator=g)
            for name in ("wqkv", "wo") for part, shape in (("A", (r, 6)), ("B", (6, r)))}


def test_each_block_of_rows_gets_its_own_checkpoints_adapter():
    """Adapters: the batch holds the checkpoints' rows one checkpoint after another; each block computes as
    peft's LoRA model of that checkpoint alone would (alpha / r scaling), the base model's block as the base."""
    from stages.recipes.assistant.select import Adapters

    torch.manual_seed(0)
    model, x = Block(), torch.randn(2, 4, 6)  # 2 rows of 4 tokens a checkpoint
    first, second = lora(model, 2, 1), lora(model, 2, 2)

    def alone(weights):  # the adapter added to each adapted linear's output, as peft's LoRA layer does
        hooks = [getattr(model, n).register_forward_hook(
            lambda m, a, out, n=n: out + (a[0] @ weights[f"base_model.model.{n}.lora_A.default.weight"].T
                                          @ weights[f"base_model.model.{n}.lora_B.default.weight"].T) * 8 / 2)
            for n in ("wqkv", "wo")] if weights else []
        try:
            return model(x)
        finally:
            for h in hooks:
                h.remove()

    expected = torch.cat([alone(first), alone(None), alone(second)])
    adapters = Adapters(model, ["wqkv", "wo"], alpha=8)
    where = Path("models/checkpoints/iter_1.pth")
    adapters.set([(first, where), (None, where), (second, where)])
    torch.testing.assert_close(model(torch.cat([x, x, x])), expected)
    adapters.set([])
    torch.testing.assert_close(model(x), alone(None))


def test_an_adapter_of_another_model_is_one_line_naming_its_file(capsys):
    from stages.errors import run
    from stages.recipes.assistant.select import Adapters

    model = Block()
    weights = {k: v for k, v in lora(model, 2, 1).items() if ".wo." not in k}  # one adapted layer short

    def main(argv):
        Adapters(model, ["wqkv", "wo"], alpha=8).set([(weights, Path("models/checkpoints/iter_7.pth"))])

    with pytest.raises(SystemExit) as exc:
        run(main, [])
    err = capsys.readouterr().err
    assert exc.value.code != 0 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "models/checkpoints/iter_7.pth: not an adapter of this model" in err and "1 adapted layers missing" in err


@pytest.mark.e2e
def test_every_checkpoint_is_scored_and_the_choice_is_what_evaluate_measured(built):
    checkpoints = sorted(int(p.stem.split("_")[1]) for p in (built / "models/checkpoints").glob("iter_*.pth"))
    train = json.loads((built / "reports/train/metrics.json").read_text())
    every = yaml.safe_load((built / "params.yaml").read_text(encoding="utf-8"))["train"]["save_interval"]
    assert checkpoints == list(range(every, train["iters"], every)) + [train["iters"]]  # every save_interval, the last
    scores = json.loads((built / "reports/select/scores.json").read_text())
    assert [r["step"] for r in scores] == [0] + checkpoints
    choice = json.loads((built / "reports/select/choice.json").read_text())
    chosen = choice["chosen_step"]
    assert (built / "models/adapter.pth").read_bytes() == (built / f"models/checkpoints/iter_{chosen}.pth").read_bytes()
    tuned = json.loads((built / "reports/eval/metrics.json").read_text())["tuned"]
    mine = next(r for r in scores if r["step"] == chosen)
    for key in ("identity_hit_rate_trained", "identity_hit_rate_heldout", "general_identity_leak"):
        assert mine[key] == tuned[key], key  # one loaded base + the adapter, as the merged model answers
    assert abs(mine["perplexity_general"] - tuned["perplexity_general"]) < 0.01 * tuned["perplexity_general"]
    assert scores[0] == {"step": 0, **{k: json.loads((built / "reports/eval/metrics.json").read_text())["base"][k]
                                      for k in mine if k != "step"}}
    report = (built / "reports/report.md").read_text()
    assert "## Which checkpoint (stage select)" in report and f"Chosen: **iter_{chosen}**" in report
    assert "![scores per checkpoint](curves.png)" in report
    curves = built / "reports/curves.png"  # drawn by the report stage in this run, after select wrote the scores
    assert curves.read_bytes()[:4] == b"\x89PNG"
    assert curves.stat().st_mtime >= (built / "reports/select/scores.json").stat().st_mtime


@pytest.mark.e2e
def test_scoring_beside_the_trainer_is_read_back_by_select(project):
    """select.during_training: true (auto is on one GPU only): the train stage starts the scorer beside its
    trainer; the select stage reads its scores back, scores again an entry whose key does not match its
    checkpoint, and, with none kept, scores every checkpoint itself: the same scores each time."""
    path = project / "params.yaml"
    text = path.read_text(encoding="utf-8")
    text = text.replace("  during_training: auto", "  during_training: true")
    text = text.replace("  max_iters: auto", "  max_iters: 30")  # checkpoints 25 and 30
    path.write_text(text, encoding="utf-8")
    out = sh("dvc", "repro", "select", cwd=project).stdout
    assert "2 checkpoints and the base model scored beside the trainer" in out, out
    assert "(3 of 3 scored during training)" in out, out
    beside = (project / "reports/select/scores.json").read_text()
    assert [r["step"] for r in json.loads(beside)] == [0, 25, 30]
    scored = project / "models/work/scores"
    entry = json.loads((scored / "iter_25.json").read_text(encoding="utf-8"))
    (scored / "iter_25.json").write_text(json.dumps({**entry, "key": "0" * 64}), encoding="utf-8")
    out = sh("dvc", "repro", "-f", "-s", "select", cwd=project).stdout
    assert "(2 of 3 scored during training)" in out and "earlier" not in out, out
    assert (project / "reports/select/scores.json").read_text() == beside
    out = sh("dvc", "repro", "-f", "-s", "select", cwd=project).stdout  # iter_25's entry is select's own now
    assert "(2 of 3 scored during training) (1 of 3 kept from an earlier select run)" in out, out
    choice = json.loads((project / "reports/select/choice.json").read_text())
    assert (choice["scored_during_training"], choice["kept_from_an_earlier_select"]) == (2, 1)
    shutil.rmtree(scored)
    out = sh("dvc", "repro", "-f", "-s", "select", cwd=project).stdout
    assert "scored during training" not in out and "earlier" not in out, out
    assert (project / "reports/select/scores.json").read_text() == beside


@pytest.mark.e2e
def test_the_rule_alone_reruns_from_select_on(project):
    path = project / "params.yaml"
    path.write_text(path.read_text(encoding="utf-8").replace("  rule: best", "  rule: last"), encoding="utf-8")
    assert set(json.loads(sh("dvc", "status", "--json", cwd=project).stdout)) == {"select"}
    out = sh("dvc", "repro", cwd=project).stdout
    choice = json.loads((project / "reports/select/choice.json").read_text())
    assert choice["chosen_step"] == choice["last_step"] and "train" not in ran(out) and "select" in ran(out)


@pytest.mark.e2e
def test_a_mixing_sweep_runs_as_a_dvc_queue_and_compares(project):
    """The README's sweep, smaller: one queued experiment over data.assistant.general_ratio, run by
    `dvc queue start`, then `python -m stages.compare` of it against the workspace."""
    sh("git", "add", "-A", cwd=project)
    sh("git", "commit", "-q", "--allow-empty", "-m", "baseline", cwd=project)
    sh("dvc", "exp", "run", "--queue", "-S", "data.assistant.general_ratio=0.4", "-S", "train.max_iters=50",
       "-n", "mix-040", cwd=project)
    sh("dvc", "queue", "start", "-j", "1", cwd=project)
    deadline = time.time() + 900
    while "Queued" in (status := sh("dvc", "queue", "status", cwd=project).stdout):  # until its worker takes it
        assert time.time() < deadline, status
        time.sleep(1)
    # `logs -f` waits for the run, reading its log once a second (a `dvc queue status` every few seconds instead
    # took a core's worth of CPU beside it)
    logs = subprocess.run(["dvc", "queue", "logs", "-f", "mix-040"], cwd=project, env=env(), capture_output=True,
                          text=True, timeout=max(1, deadline - time.time()))
    status = sh("dvc", "queue", "status", cwd=project).stdout
    assert "Success" in status, status + logs.stdout[-3000:] + logs.stderr[-3000:]
    shown = json.dumps(json.loads(sh("dvc", "exp", "show", "--json", cwd=project).stdout))
    assert "mix-040" in shown and "chosen_step" in shown
    out = sh("python", "-m", "stages.compare", "workspace", "mix-040", cwd=project).stdout
    assert (project / "reports/compare/compare.md").is_file(), out
    assert "general_ratio" in (project / "reports/compare/compare.md").read_text()
    assert (project / "reports/compare/frontier.png").read_bytes()[:4] == b"\x89PNG"  # both runs' checkpoints
