"""Several processes, several nodes: where torchrun's nodes meet (params, `auto` from what a scheduler
sets), the command each node runs, and what render gives several CPU processes. No training here:
tests/test_distributed.py runs the processes for real."""
from dataclasses import replace

import pytest

from stages import launch, params as P, plan
from stages.errors import StageError
from stages.recipes.assistant import config as assistant_config
from tests.conftest import ROOT

PARAMS = P.load(ROOT / "params.yaml")


def train(**changes):
    return replace(PARAMS.train, **changes)


def test_one_node_meets_itself_on_loopback_at_a_free_port_whatever_the_environment():
    """A scheduler's MASTER_ADDR/PORT are for runs over several nodes; two one-node runs on a host must
    not meet each other."""
    env = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "SLURM_NODEID": "0"}
    a, b = launch.rendezvous(train(gpus=2), env), launch.rendezvous(train(gpus=2), env)
    assert (a["node_rank"], a["master_addr"]) == (0, "127.0.0.1")
    assert a["master_port"] != 29500 and a["master_port"] != b["master_port"]


def test_several_nodes_take_rank_address_and_port_from_slurm_and_torchrun_variables():
    t = train(nodes=4)
    env = {"SLURM_NODEID": "3", "NODE_RANK": "1", "MASTER_ADDR": "gpu-node-07", "MASTER_PORT": "29611"}
    assert launch.rendezvous(t, env) == {"node_rank": 3, "master_addr": "gpu-node-07", "master_port": 29611}
    del env["SLURM_NODEID"], env["MASTER_PORT"]  # outside Slurm: torchrun's own names, its default port
    assert launch.rendezvous(t, env) == {"node_rank": 1, "master_addr": "gpu-node-07", "master_port": 29500}
    # params win over the environment
    fixed = train(nodes=4, node_rank=2, master_addr="10.1.2.3", master_port=40000)
    assert launch.rendezvous(fixed, env) == {"node_rank": 2, "master_addr": "10.1.2.3", "master_port": 40000}


@pytest.mark.parametrize("t, env, words", [
    (train(nodes=2), {"SLURM_NODEID": "0"}, ["train.master_addr: auto, but $MASTER_ADDR is not set"]),
    (train(nodes=2), {"SLURM_NODEID": "2", "MASTER_ADDR": "n0"}, ["train.node_rank: auto gives 2 ($SLURM_NODEID)",
                                                                   "not below train.nodes 2"]),
    (train(nodes=2), {"NODE_RANK": "first", "MASTER_ADDR": "n0"}, ["$NODE_RANK is 'first', not a node index"]),
    (train(nodes=2), {"MASTER_ADDR": "n0", "MASTER_PORT": "99999"}, ["$MASTER_PORT is '99999', not a TCP port"]),
])
def test_a_rendezvous_that_cannot_work_is_one_line(t, env, words):
    with pytest.raises(StageError) as err:
        launch.rendezvous(t, env)
    assert "\n" not in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_each_node_runs_torchrun_with_its_rank_and_the_stage_as_worker():
    t = train(gpus=8, nodes=2)
    cmd = launch.torchrun_command(t, {"node_rank": 1, "master_addr": "n0", "master_port": 29500},
                                  ["--params", "params.yaml"])
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert {"--nnodes=2", "--node-rank=1", "--nproc-per-node=8", "--master-addr=n0", "--master-port=29500"} <= set(cmd)
    assert cmd[-5:] == ["-m", "stages.train", "--worker", "--params", "params.yaml"]


def test_several_cpu_processes_render_plain_ddp_over_gloo_without_a_device(tmp_path):
    """No DeepSpeed on a CPU; mmengine's DDP wrapper given no GPU id; the global batch split over the
    processes of every node."""
    p = replace(PARAMS, train=train(device="cpu", gpus=2, nodes=2, global_batch=8))
    r = plan.resolve(p, cuda=False, bf16=False)
    assert (r["deepspeed"], r["gpus"], r["nodes"], r["micro_batch"] * r["grad_accum"]) == ("none", 2, 2, 2)
    cfg = plan.check_config(plan.write_config(assistant_config.text(p, r), r, tmp_path / "config"))
    assert cfg.env_cfg.dist_cfg.backend == "gloo"
    assert cfg.model_wrapper_cfg.type == "MMDistributedDataParallel" and cfg.model_wrapper_cfg.device_ids is None
    one = plan.resolve(replace(PARAMS, train=train(device="cpu")), cuda=False, bf16=False)
    assert "model_wrapper_cfg" not in assistant_config.text(PARAMS, one)  # one process: no wrapper at all


def test_several_gpus_keep_deepspeed_zero2_and_mmengine_s_own_wrapper():
    h100 = dict(cuda=True, bf16=True, card_gb=85.0, shape={"hidden": 2048, "layers": 24, "intermediate": 8192,
                                                            "vocab": 92544, "kv": 1024, "arch": "InternLM2ForCausalLM"})
    p = replace(PARAMS, train=train(gpus=8, nodes=2, global_batch=32))
    r = plan.resolve(p, **h100)
    assert (r["deepspeed"], r["compile_layers"], r["micro_batch"] * r["grad_accum"]) == ("zero2", False, 2)
    text = assistant_config.text(p, r)
    assert "model_wrapper_cfg" not in text and "backend='nccl'" in text
    assert "torchrun --nnodes 2 --node-rank N --master-addr NODE0 --nproc-per-node 8" in text
