# Rendered by `dvc repro render` (stages/render.py, stages/recipes/assistant/template.py.j2) from params.yaml. Do not edit: change params.yaml.
#
# XTuner config of the self-cognition assistant: InternLM2-chat QLoRA, as XTuner's
# internlm2_chat_1_8b_qlora_alpaca_e3 edited by the tutorial (openai_map_fn, load_dataset('json'),
# pack_to_max_length, EvaluateChatHook with the evaluation prompts). Literal values only: mmengine
# parses configs in lazy-import mode.
#
# Run it:   dvc repro train
# By hand:  python -m xtuner.tools.train models/config/xtuner_config.py --work-dir models/work
import torch
from datasets import load_dataset
from mmengine.dataset import DefaultSampler
from mmengine.hooks import (CheckpointHook, DistSamplerSeedHook, IterTimerHook, LoggerHook,
                            ParamSchedulerHook)
from mmengine.optim import AmpOptimWrapper, CosineAnnealingLR, LinearLR
from mmengine.visualization import LocalVisBackend, Visualizer
from peft import LoraConfig
from torch.optim import AdamW
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from xtuner.dataset import process_hf_dataset
from xtuner.dataset.collate_fns import default_collate_fn
from xtuner.dataset.map_fns import openai_map_fn, template_map_fn_factory
from xtuner.engine.hooks import DatasetInfoHook, EvaluateChatHook, ThroughputHook
from stages.background_save import BackgroundCheckpoints
from stages.kernels import full_batches
from stages.snapshots import AdapterSnapshots
from stages.throughput import RunThroughput
from stages.overlap import Overlap
from xtuner.engine.runner import TrainLoop
from xtuner.model import SupervisedFinetune
from xtuner.utils import PROMPT_TEMPLATE

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
pretrained_model_name_or_path = 'models/assistant/llm'
data_path = 'data/validated/assistant/train.jsonl'
prompt_template = PROMPT_TEMPLATE.internlm2_chat
max_length = 256
pack_to_max_length = True

batch_size = 1  # per device
accumulative_counts = 1  # 1 x 1 accum x 1 GPU x 256 tokens = 256 tokens per step
dataloader_num_workers = 0
lr = 0.004
betas = (0.9, 0.999)
weight_decay = 0.0
max_norm = 1.0  # grad clip
warmup_iters = 5  # in iterations: XTuner's 0.03 ratio is 0 on short runs

save_steps = 25
save_total_limit = 2

evaluation_freq = 50
SYSTEM = ''
evaluation_inputs = ['请你介绍一下你自己', '你是谁', '你是我的小助手吗']

#######################################################################
#                      PART 2  Model & Tokenizer                      #
#######################################################################
tokenizer = dict(
    type=AutoTokenizer.from_pretrained,
    pretrained_model_name_or_path=pretrained_model_name_or_path,
    trust_remote_code=True,
    padding_side='right')

model = dict(
    type=SupervisedFinetune,
    use_varlen_attn=False,
    # Not a top-level variable: mmengine's runner reads a top-level `activation_checkpointing`.
    use_activation_checkpointing=False,
    llm=dict(
        type=AutoModelForCausalLM.from_pretrained,
        pretrained_model_name_or_path=pretrained_model_name_or_path,
        trust_remote_code=True,
        torch_dtype=torch.bfloat16,
        quantization_config=dict(
            type=BitsAndBytesConfig,
            load_in_4bit=True,
            load_in_8bit=False,
            llm_int8_threshold=6.0,
            llm_int8_has_fp16_weight=False,
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_type='nf4')),
    lora=dict(
        type=LoraConfig,
        r=64,
        lora_alpha=64,
        lora_dropout=0.1,
        target_modules=['w1', 'w2', 'w3', 'wo', 'wqkv'],
        bias='none',
        task_type='CAUSAL_LM'))

#######################################################################
#                      PART 3  Dataset & Dataloader                   #
#######################################################################
train_dataset = dict(
    type=process_hf_dataset,
    dataset=dict(type=load_dataset, path='json', data_files=dict(train=data_path)),
    tokenizer=tokenizer,
    max_length=max_length,
    dataset_map_fn=openai_map_fn,
    template_map_fn=dict(type=template_map_fn_factory, template=prompt_template),
    remove_unused_columns=True,
    shuffle_before_pack=True,
    pack_to_max_length=pack_to_max_length,
    use_varlen_attn=False,
    map_num_proc=8)

train_dataloader = dict(
    batch_size=batch_size,
    num_workers=dataloader_num_workers,
    pin_memory=True,  # copied to the GPU without blocking (stages/overlap.py)
    dataset=train_dataset,
    sampler=dict(type=DefaultSampler, shuffle=True, seed=0),
    # every batch of one shape, the epoch's last too: compiled layers do not compile again (stages/kernels.py)
    collate_fn=dict(type=full_batches, micro_batch=batch_size, max_length=256,
                    use_varlen_attn=False))

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
optim_wrapper = dict(
    type=AmpOptimWrapper,
    optimizer=dict(type=AdamW, lr=lr, betas=betas, weight_decay=weight_decay, fused=True),
    clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
    loss_scale={'enabled': False},
    dtype='bfloat16',
    accumulative_counts=accumulative_counts)

# Linear warm-up over warmup_iters, cosine decay over the whole run (the two factors multiply).
param_scheduler = [
    dict(type=LinearLR, start_factor=1e-5, by_epoch=False, begin=0, end=warmup_iters),
    dict(type=CosineAnnealingLR, eta_min=0.0, by_epoch=True, begin=0, end=4,
         convert_to_iter_based=True),
]
train_cfg = dict(type=TrainLoop, max_epochs=4)

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
custom_hooks = [
    # checkpoints written to disk by a thread while training goes on (stages/background_save.py)
    dict(type=BackgroundCheckpoints),
    dict(type=DatasetInfoHook, tokenizer=tokenizer),
    dict(type=EvaluateChatHook, tokenizer=tokenizer, every_n_iters=evaluation_freq,
         evaluation_inputs=evaluation_inputs, system=SYSTEM, prompt_template=prompt_template,
         max_new_tokens=48),
    dict(type=ThroughputHook),
    # the run's tokens/s: all tokens over all iterations' time, after the first logging interval
    dict(type=RunThroughput, skip=10),
    # every checkpoint's adapter weights alone, for the select stage (stages/snapshots.py)
    dict(type=AdapterSnapshots, folder='models/work/snapshots'),
    # the host works on while the GPU runs: no wait for it at an iteration's end (stages/overlap.py)
    dict(type=Overlap),
]

default_hooks = dict(
    timer=dict(type=IterTimerHook),
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval=10),
    param_scheduler=dict(type=ParamSchedulerHook),
    checkpoint=dict(type=CheckpointHook, by_epoch=False, interval=save_steps,
                    max_keep_ckpts=save_total_limit, save_last=True),
    sampler_seed=dict(type=DistSamplerSeedHook),
)

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'),
)

# Scalars go to vis_data/scalars.json; the train stage turns them into DVCLive plots. (mmengine's
# DVCLive backend is not used: it runs `dvc init -f` when git has no author.)
visualizer = dict(type=Visualizer, vis_backends=[dict(type=LocalVisBackend)])
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0, deterministic=False)
log_processor = dict(by_epoch=False)

# Read by the pipeline's train stage, ignored by XTuner.
pipeline = {'device': 'cuda', 'precision': 'bf16', 'deepspeed': 'none', 'gpus': 1, 'nodes': 1, 'torch_dtype': 'bfloat16', 'compute_dtype': 'bfloat16', 'memory_gb': 76.5, 'micro_batch': 1, 'grad_accum': 1, 'checkpointing': False, 'checkpoint_layers': None, 'offload_activations': False, 'tile_mlp': 0, 'estimate_gb': 4.9, 'fused_loss': True, 'loss_chunk_mb': 1024, 'compile_layers': True, 'compile_loss': True, 'gqa': True, 'rope_table': True, 'cuda_graphs': True, 'overlap': True, 'tune_kernels': False, 'fp8': False, 'fp8_keep': False, 'fp8_fast_accum': False, 'fp8_fast_accum_grad': False, 'upcast_frozen': False, 'lora_targets': ['w1', 'w2', 'w3', 'wo', 'wqkv'], 'max_length': 256, 'cpu_threads': None, 'deepspeed_config': None}
