"""InternVLChatConfig of the pipeline's tiny InternVL stand-in (models/tiny-internvl).

Written for this project, not InternVL's code: a config with the fields XTuner's InternVL_V1_5 model
and InternVL_V1_5_Dataset read (`vision_config`, `llm_config`, `template`, `downsample_ratio`,
`select_layer`, `ps_version`, `force_image_size`, `min_dynamic_patch`, `max_dynamic_patch`,
`use_thumbnail`, `dynamic_image_size`). The vision part is a CLIP vision config, the language part a
Llama config. `llm_config.architectures` says which chat format the LLM speaks (InternLM2's: XTuner's
dataset picks its template by it), while `llm_config.model_type` says what it is built as (llama).
It exercises the pipeline's plumbing; a real InternVL2-2B directory brings its own remote code.
"""
from transformers import CLIPVisionConfig, LlamaConfig, PretrainedConfig


class InternVLChatConfig(PretrainedConfig):
    model_type = "internvl_chat"
    is_composition = True

    def __init__(self, vision_config=None, llm_config=None, select_layer=-1, force_image_size=None,
                 downsample_ratio=0.5, template="internlm2-chat", system_message="", dynamic_image_size=True,
                 use_thumbnail=True, ps_version="v2", min_dynamic_patch=1, max_dynamic_patch=6, **kwargs):
        super().__init__(**kwargs)
        self.vision_config = vision_config if isinstance(vision_config, CLIPVisionConfig) else \
            CLIPVisionConfig(**(vision_config or {}))
        self.llm_config = llm_config if isinstance(llm_config, LlamaConfig) else LlamaConfig(**(llm_config or {}))
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
