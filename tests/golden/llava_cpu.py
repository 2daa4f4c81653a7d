# Rendered by `dvc repro render` (stages/recipes/llava/template.py.j2) from params.yaml. Do not edit: change params.yaml.
#
# XTuner LLaVA config, finetune phase: as XTuner's
# llava_internlm2_chat_1_8b_qlora_clip_vit_large_p14_336_lora_e1_gpu8_finetune (QLoRA on the LLM, LoRA
# on the ViT, the projector from the pretrain phase trains on; LengthGroupedSampler)
# with local models and data, iteration-based schedule, warm-up in iterations. Literal values only:
# mmengine parses configs in lazy-import mode.
#
# Run it:   dvc repro train
# By hand:  python -m xtuner.tools.train models/config/xtuner_config.py --work-dir models/work
import torch
from mmengine.hooks import (CheckpointHook, DistSamplerSeedHook, IterTimerHook, LoggerHook,
                            ParamSchedulerHook)
from mmengine.optim import OptimWrapper, CosineAnnealingLR, LinearLR
from mmengine.visualization import LocalVisBackend, Visualizer
from peft import LoraConfig
from torch.optim import AdamW
from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, CLIPImageProcessor,
                          CLIPVisionModel)

from xtuner.dataset import LLaVADataset
from xtuner.dataset.collate_fns import default_collate_fn
from xtuner.dataset.samplers import LengthGroupedSampler
from stages.background_save import BackgroundCheckpoints
from xtuner.engine.hooks import DatasetInfoHook, EvaluateChatHook
from xtuner.engine.runner import TrainLoop
from xtuner.model import LLaVAModel
from xtuner.utils import PROMPT_TEMPLATE

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
llm_name_or_path = 'models/llava/llm'
visual_encoder_name_or_path = 'models/llava/vision'
# the projector from the pretrain phase (or llava.pretrained_pth); XTuner loads it with strict=False,
# so the pipeline checks it first (stages/recipes/llava/model.py check_pretrained_pth)
pretrained_pth = 'models/pretrain/projector.pth'
# tokenized once by the train stage (stages/recipes/llava/model.py tokenize: XTuner's process_hf_dataset with one
# process; LLaVADataset itself maps with 32: 17 s instead of 0.1 s for 160 records on 2 cores)
offline_processed_text_folder = 'models/pretrain/llava_text'
image_folder = 'data/raw/llava'
prompt_template = PROMPT_TEMPLATE.internlm2_chat
max_length = 192  # 256 - 64 image tokens ((image_size / patch_size) ** 2)

batch_size = 1  # per device
accumulative_counts = 1
dataloader_num_workers = 0
lr = 0.004
betas = (0.9, 0.999)
weight_decay = 0.0
max_norm = 1.0  # grad clip
warmup_iters = 5  # in iterations: XTuner's 0.03 ratio is 0 on short runs
max_iters = 320

save_steps = 25
save_total_limit = 2

evaluation_freq = 50
SYSTEM = ''
evaluation_images = 'data/raw/llava/images/red_circle_on_white.png'
evaluation_inputs = ['请描述这张图片。']

#######################################################################
#            PART 2  Model & Tokenizer & Image Processor              #
#######################################################################
tokenizer = dict(
    type=AutoTokenizer.from_pretrained,
    pretrained_model_name_or_path=llm_name_or_path,
    trust_remote_code=True,
    padding_side='right')

image_processor = dict(
    type=CLIPImageProcessor.from_pretrained,
    pretrained_model_name_or_path=visual_encoder_name_or_path,
    trust_remote_code=True)

model = dict(
    type=LLaVAModel,
    freeze_llm=True,
    freeze_visual_encoder=True,
    visual_select_layer=-2,
    pretrained_pth=pretrained_pth,
    llm=dict(
        type=AutoModelForCausalLM.from_pretrained,
        pretrained_model_name_or_path=llm_name_or_path,
        trust_remote_code=True,
        torch_dtype=torch.float32,
        quantization_config=dict(
            type=BitsAndBytesConfig,
            load_in_4bit=True,
            load_in_8bit=False,
            llm_int8_threshold=6.0,
            llm_int8_has_fp16_weight=False,
            bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_type='nf4')),
    llm_lora=dict(
        type=LoraConfig,
        r=64,
        lora_alpha=64,
        lora_dropout=0.1,
        target_modules=['w1', 'w2', 'w3', 'wo', 'wqkv'],
        bias='none',
        task_type='CAUSAL_LM'),
    # float32 as in XTuner's config (the projector follows its dtype); on CPU the LLM is float32 too:
    # one dtype for all parts, or the chat hook fails (float16 LLM vs float32 ViT)
    visual_encoder=dict(
        type=CLIPVisionModel.from_pretrained,
        pretrained_model_name_or_path=visual_encoder_name_or_path),
    visual_encoder_lora=dict(
        type=LoraConfig,
        r=16,
        lora_alpha=16,
        lora_dropout=0.05,
        target_modules=None,
        bias='none'),
)

#######################################################################
#                      PART 3  Dataset & Dataloader                   #
#######################################################################
llava_dataset = dict(
    type=LLaVADataset,
    offline_processed_text_folder=offline_processed_text_folder,
    image_folder=image_folder,
    image_processor=image_processor,
    pad_image_to_square=True)

train_dataloader = dict(
    batch_size=batch_size,
    num_workers=dataloader_num_workers,
    dataset=llava_dataset,
    sampler=dict(
        type=LengthGroupedSampler,
        length_property='modality_length',
        per_device_batch_size=batch_size * accumulative_counts,
        seed=0),
    collate_fn=dict(type=default_collate_fn))

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
optim_wrapper = dict(
    type=OptimWrapper,
    optimizer=dict(type=AdamW, lr=lr, betas=betas, weight_decay=weight_decay),
    clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
    accumulative_counts=accumulative_counts)

# Linear warm-up over warmup_iters, cosine decay over the whole run (the two factors multiply).
param_scheduler = [
    dict(type=LinearLR, start_factor=1e-5, by_epoch=False, begin=0, end=warmup_iters),
    dict(type=CosineAnnealingLR, eta_min=0.0, by_epoch=False, begin=0, end=max_iters),
]
train_cfg = dict(type=TrainLoop, max_iters=max_iters)

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
custom_hooks = [
    # checkpoints written to disk by a thread while training goes on (stages/background_save.py)
    dict(type=BackgroundCheckpoints),
    dict(type=DatasetInfoHook, tokenizer=tokenizer),
    dict(type=EvaluateChatHook, tokenizer=tokenizer, image_processor=image_processor,
         every_n_iters=evaluation_freq, evaluation_inputs=evaluation_inputs,
         evaluation_images=evaluation_images, system=SYSTEM, prompt_template=prompt_template,
         max_new_tokens=48),
]

default_hooks = dict(
    timer=dict(type=IterTimerHook),
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval=1),
    param_scheduler=dict(type=ParamSchedulerHook),
    checkpoint=dict(type=CheckpointHook, by_epoch=False, interval=save_steps,
                    max_keep_ckpts=save_total_limit, save_last=True),
    sampler_seed=dict(type=DistSamplerSeedHook),
)

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='gloo'),
)

visualizer = dict(type=Visualizer, vis_backends=[dict(type=LocalVisBackend)])
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0, deterministic=False)
log_processor = dict(by_epoch=False)

# Read by the pipeline's stages, ignored by XTuner.
pipeline = {'device': 'cpu', 'precision': 'fp32', 'deepspeed': 'none', 'gpus': 1, 'nodes': 1, 'torch_dtype': 'float32', 'compute_dtype': 'float32', 'memory_gb': None, 'micro_batch': 1, 'grad_accum': 1, 'checkpointing': False, 'checkpoint_layers': None, 'offload_activations': False, 'tile_mlp': 0, 'estimate_gb': None, 'fused_loss': False, 'loss_chunk_mb': 1024, 'compile_layers': False, 'compile_loss': False, 'gqa': False, 'rope_table': False, 'cuda_graphs': False, 'overlap': False, 'tune_kernels': False, 'fp8': False, 'fp8_keep': False, 'fp8_fast_accum': False, 'fp8_fast_accum_grad': False, 'upcast_frozen': False, 'lora_targets': ['w1', 'w2', 'w3', 'wo', 'wqkv'], 'max_length': 256, 'cpu_threads': None, 'recipe': 'llava', 'phase': 'finetune', 'image_tokens': 64, 'deepspeed_config': None}
