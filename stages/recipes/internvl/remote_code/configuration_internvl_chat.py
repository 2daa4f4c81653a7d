"""InternVLChatConfig of the pipeline's InternVL stand-in (models/internvl/model; see stages/recipes/internvl/model.py).

Written for this project, not InternVL's code. It composes the two configurations that InternVL2-2B's
directory also carries, copied in beside this file from the installed XTuner package when the
stand-in is built: InternViT's (`configuration_intern_vit.py`, InternVisionConfig) and InternLM2's
(`configuration_internlm2.py`, InternLM2Config), with the fields XTuner's InternVL_V1_5 and
InternVL_V1_5_Dataset read (`template`, `downsample_ratio`, `select_layer`, `ps_version`,
`force_image_size`, `min_dynamic_patch`, `max_dynamic_patch`, `use_thumbnail`, `dynamic_image_size`).
"""
from transformers import LlamaConfig, PretrainedConfig

from .configuration_intern_vit import InternVisionConfig
from .configuration_internlm2 import InternLM2Config


class InternVLChatConfig(PretrainedConfig):
    model_type = "internvl_chat"
    is_composition = True

    def __init__(self, vision_config=None, llm_config=None, select_layer=-1, force_image_size=None,
                 downsample_ratio=0.5, template="internlm2-chat", system_message="", dynamic_image_size=True,
                 use_thumbnail=True, ps_version="v2", min_dynamic_patch=1, max_dynamic_patch=6, **kwargs):
        super().__init__(**kwargs)
        vision_config = vision_config or {}
        self.vision_config = vision_config if isinstance(vision_config, PretrainedConfig) else \
            InternVisionConfig(**vision_config)
        llm_config = llm_config or {"architectures": ["InternLM2ForCausalLM"]}
        if isinstance(llm_config, PretrainedConfig):
            self.llm_config = llm_config
        elif llm_config.get("model_type") == "llama":  # a Llama-format LLM (stand_in.tiny.llm.architecture: llama)
            self.llm_config = LlamaConfig(**llm_config)
        else:
            self.llm_config = InternLM2Config(**llm_config)
        self.select_layer = select_layer
        self.force_image_size = force_image_size or self.vision_config.image_size
        self.downsample_ratio = downsample_ratio
        self.template = template
        self.system_message = system_message
        self.dynamic_image_size = dynamic_image_size
        self.use_thumbnail = use_thumbnail
        self.ps_version = ps_version
        self.min_dynamic_patch = min_dynamic_patch
        self.max_dynamic_patch = max_dynamic_patch
        self.tie_word_embeddings = self.llm_config.tie_word_embeddings

    def to_dict(self):
        out = super().to_dict()
        out["vision_config"] = self.vision_config.to_dict()
        out["llm_config"] = self.llm_config.to_dict()
        return out
