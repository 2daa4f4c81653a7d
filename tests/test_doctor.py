import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from stages import doctor, params as P
from tests.conftest import env, sh


def test_all_green_on_the_built_project(built):
    proc = subprocess.run([sys.executable, "-m", "stages.doctor"], cwd=built, env=env(), capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("params", "model", "structure", "stack", "device", "bitsandbytes", "disk", "git"):
        assert f"  {name}" in proc.stdout
    assert "FAIL" not in proc.stdout


def test_missing_model_fails_with_one_line(project):
    import shutil

    shutil.rmtree(project / "models/assistant/llm")
    proc = sh(sys.executable, "-m", "stages.doctor", cwd=project, check=False)
    assert proc.returncode == 1
    assert "FAIL  model" in proc.stdout and "models/assistant/llm is not a directory" in proc.stdout
    assert proc.stderr.strip() == "error: doctor: 1 check(s) would fail: model"


def test_git_without_a_commit_is_fatal(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    check = doctor.check_git()
    assert not check.ok and check.fatal and "no commit yet" in check.detail


def test_cuda_asked_for_on_a_cpu_machine(built):
    import torch

    p = P.load(built / "params.yaml")
    p = replace(p, train=replace(p.train, device="cuda"))
    check = doctor.check_device(p)
    assert check.ok == torch.cuda.is_available()


def test_fp8_on_a_gpu_without_float8_fails_the_preflight(monkeypatch):
    """train.fp8 on an A100 (compute capability 8.0): the preflight, which the train stage runs before it loads
    anything, names the key and the GPU; without train.fp8 the same GPU passes and is said to have no float8."""
    import torch

    from stages import fp8

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    p = P.load(Path(__file__).resolve().parents[1] / "params.yaml")
    check = doctor.check_device(replace(p, train=replace(p.train, fp8=True)))
    assert not check.ok and check.fatal and "train.fp8: true, but NVIDIA A100-SXM4-80GB (compute capability 8.0; " \
        "float8 needs 8.9 or above); set train.fp8: false" in check.detail
    check = doctor.check_device(p)
    assert check.ok and check.detail.endswith("bf16, no float8")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert doctor.check_device(replace(p, train=replace(p.train, fp8=True))).ok
    assert fp8.check_gpu() is None


def test_bitsandbytes_kernels_run_here(built):
    check = doctor.check_bnb(P.load(built / "params.yaml"))
    assert check.ok, check.detail


def test_disk_needs_room_for_three_copies_of_the_model(tmp_path, monkeypatch):
    """The rule, on a model of known size and a disk of given room: 3 x the model + 1 GiB free passes,
    a byte less fails (whatever this machine's disk holds)."""
    import collections

    base = P.load()
    monkeypatch.chdir(tmp_path)  # the model folder is models/assistant/llm, relative to the project
    model = tmp_path / "models/assistant/llm"
    (model / "sub").mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"\0" * 3000)
    (model / "sub" / "tokenizer.json").write_bytes(b"\0" * 1000)
    need = 3 * 4000 + 2**30
    usage = collections.namedtuple("usage", "total used free")
    p = base
    for free, ok in ((need, True), (need - 1, False)):
        monkeypatch.setattr(doctor.shutil, "disk_usage", lambda root, free=free: usage(2 * need, need, free))
        check = doctor.check_disk(p, tmp_path)
        assert check.name == "disk" and check.ok == ok, (free, check.detail)
        assert check.detail == f"{free / 2**30:.1f} GiB free, about {need / 2**30:.1f} GiB needed"


def test_memory_check_weighs_the_setting_against_the_card(tmp_path, monkeypatch):
    """The 1.8B shape at micro-batch 16 without checkpointing cannot fit a 24 GB card: fatal; with
    micro_batch auto the planner's setting fits. (The card is given; this machine has no GPU.)"""
    import json

    from stages import plan

    base = P.load()
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "models/assistant/llm"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({
        "hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 8,
        "intermediate_size": 8192, "vocab_size": 92544}))
    monkeypatch.setattr(plan, "machine", lambda: {"cuda": True, "bf16": True, "card_gb": 24.0})
    p = replace(base, data=replace(base.data, max_length=2048),
                train=replace(base.train, global_batch=16, micro_batch=16, activation_checkpointing=False))
    check = doctor.check_memory(p)
    assert not check.ok and check.fatal and "lower train.memory_gb" in check.detail
    auto = doctor.check_memory(replace(p, train=replace(p.train, micro_batch="auto", activation_checkpointing="auto")))
    assert auto.ok and "micro-batch 4 x 4, checkpointing True (the first " in auto.detail
    (tmp_path / "models/llava").mkdir()
    (tmp_path / "models/llava/llm").symlink_to(model)
    image = doctor.check_memory(replace(p, recipe="llava"))  # the estimate models the text recipe only
    assert image.ok and "not estimated for recipe llava: micro-batch 16 x 1" in image.detail
