"""Training scalars to DVCLive: the summary, and the outputs DVC expects even from a short run."""
import json

from stages import train_log

PIPELINE = {"device": "cuda", "gpus": 1}


def write_scalars(work, rows):
    folder = work / "20261124_000000" / "vis_data"
    folder.mkdir(parents=True)
    (folder / "scalars.json").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_run_shorter_than_the_log_interval_still_leaves_the_plots_folder(tmp_path):
    """Fewer iterations than the log interval log no step; DVC still needs the plots output."""
    (tmp_path / "work").mkdir()
    summary = train_log.write_live(tmp_path / "work", 3.0, PIPELINE, out=tmp_path / "live")
    assert (tmp_path / "live" / "plots" / "metrics").is_dir()
    assert summary["iters"] == 0 and summary["final_loss"] is None


def test_tokens_per_sec_from_iteration_time_where_the_throughput_hook_does_not_run(tmp_path):
    rows = [{"step": s, "loss": 2.0, "time": t} for s, t in ((10, 9.0), (20, 0.5), (30, 0.25))]
    write_scalars(tmp_path / "work", rows)
    steps = train_log.read_scalars(tmp_path / "work")
    assert train_log.summarize(steps, 1.0, PIPELINE)["tokens_per_sec"] is None
    # the first logged interval holds the start-up and is left out: (1000/0.5 + 1000/0.25) / 2
    assert train_log.summarize(steps, 1.0, PIPELINE, tokens_per_iter=1000)["tokens_per_sec"] == 3000.0
    logged = [{**r, "tokens_per_sec": 7.0} for r in rows]  # XTuner's own figure wins
    write_scalars(tmp_path / "work2", logged)
    assert train_log.summarize(train_log.read_scalars(tmp_path / "work2"), 1.0, PIPELINE, 1000)["tokens_per_sec"] == 7.0
