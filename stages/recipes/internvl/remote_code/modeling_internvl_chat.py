"""InternVLChatModel of the pipeline's InternVL stand-in (models/internvl/model; see stages/recipes/internvl/model.py).

Written for this project, not InternVL's code: InternVL2's composition with the interface XTuner's
InternVL_V1_5 and the evaluate stage use. Its parts are the real structures, from the files copied in
beside this one from the installed XTuner package when the stand-in is built, as InternVL2-2B's
directory carries them: `vision_model` (InternViT, `modeling_intern_vit.py`), `mlp1` (LayerNorm,
Linear, GELU, Linear over pixel-shuffled patch features, as InternVL2) and `language_model`
(InternLM2ForCausalLM, `modeling_internlm2.py`). `extract_feature` drops InternViT's CLS token and
pixel-shuffles the patch grid as InternVL2's v2 shuffle does. An image reaches the LLM as `<img>` +
`<IMG_CONTEXT>` x num_image_token per tile + `</img>`; the `<IMG_CONTEXT>` positions' embeddings are
replaced by the image's features. What differs from InternVL2's own file: no conversation-template
module (the prompt is InternLM2's chat format, built in `prompt`), no batch_chat, no flash-attention
switches of its own.
"""
import torch
from torch import nn
from transformers import GenerationConfig, LlamaForCausalLM, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_internvl_chat import InternVLChatConfig
from .modeling_intern_vit import InternVisionModel
from .modeling_internlm2 import InternLM2ForCausalLM

IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN = "<img>", "</img>", "<IMG_CONTEXT>"


class InternVLChatModel(PreTrainedModel):
    config_class = InternVLChatConfig
    main_input_name = "pixel_values"
    base_model_prefix = "language_model"
    _no_split_modules = ["InternVisionEncoderLayer", "InternLM2DecoderLayer", "LlamaDecoderLayer"]
    _supports_flash_attn_2 = True
    _supports_sdpa = True

    def __init__(self, config, vision_model=None, language_model=None):
        super().__init__(config)
        patch = config.vision_config.patch_size
        self.select_layer = config.select_layer
        self.template = config.template
        self.downsample_ratio = config.downsample_ratio
        self.ps_version = config.ps_version
        self.num_image_token = int((config.force_image_size // patch) ** 2 * config.downsample_ratio ** 2)
        self.vision_model = vision_model or InternVisionModel(config.vision_config)
        llm_class = LlamaForCausalLM if config.llm_config.model_type == "llama" else InternLM2ForCausalLM
        self.language_model = language_model or llm_class(config.llm_config)
        width = config.vision_config.hidden_size * int(round(1 / config.downsample_ratio)) ** 2
        hidden = config.llm_config.hidden_size
        self.mlp1 = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.img_context_token_id = None
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, 0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    # -- image features -----------------------------------------------------------------------

    def pixel_shuffle(self, x, scale_factor=0.5):
        """(n, w, h, c) -> (n, w * s, h * s, c / s^2), InternVL2's v2 order: the rows are folded into
        the channels first, then the columns, so each token holds a block of 1/s x 1/s neighbours."""
        n, w, h, c = x.shape
        x = x.reshape(n, w, int(h * scale_factor), int(c / scale_factor)).permute(0, 2, 1, 3)
        x = x.reshape(n, int(h * scale_factor), int(w * scale_factor), int(c / scale_factor ** 2))
        return x.permute(0, 2, 1, 3).contiguous()

    def extract_feature(self, pixel_values):
        """Tiles (n, 3, H, W) -> LLM-width image tokens (n, num_image_token, hidden)."""
        out = self.vision_model(pixel_values=pixel_values, output_hidden_states=self.select_layer != -1,
                                return_dict=True)
        feats = out.last_hidden_state if self.select_layer == -1 else out.hidden_states[self.select_layer]
        feats = feats[:, 1:, :]  # no CLS token
        side = int(round(feats.shape[1] ** 0.5))
        feats = self.pixel_shuffle(feats.reshape(feats.shape[0], side, side, -1), self.downsample_ratio)
        return self.mlp1(feats.reshape(feats.shape[0], -1, feats.shape[-1]))

    def _embeds(self, pixel_values, input_ids):
        embeds = self.language_model.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            vit = self.extract_feature(pixel_values.to(self.vision_model.dtype)).to(embeds.dtype)
            selected = input_ids == self.img_context_token_id
            embeds = embeds.clone()
            embeds[selected] = vit.reshape(-1, embeds.shape[-1])[: int(selected.sum())]
        return embeds

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None, position_ids=None, image_flags=None,
                past_key_values=None, labels=None, use_cache=None, return_dict=None, **kwargs):
        if pixel_values is not None and image_flags is not None:
            pixel_values = pixel_values[image_flags.reshape(-1) == 1]
        out = self.language_model(inputs_embeds=self._embeds(pixel_values, input_ids), attention_mask=attention_mask,
                                  position_ids=position_ids, past_key_values=past_key_values, labels=labels,
                                  use_cache=use_cache, return_dict=True)
        return CausalLMOutputWithPast(loss=out.loss, logits=out.logits, past_key_values=out.past_key_values)

    @torch.no_grad()
    def generate(self, pixel_values=None, input_ids=None, attention_mask=None, **generate_kwargs):
        """The LLM's generate from the prompt's embeddings (images spliced in); the new tokens only."""
        lm = self.language_model
        prepare = type(lm).prepare_inputs_for_generation

        def embeds_first(input_ids, past_key_values=None, inputs_embeds=None, **kwargs):
            # InternLM2's code uses inputs_embeds only while past_key_values is None, and transformers'
            # generate passes an empty cache from the first step on
            out = prepare(lm, input_ids, past_key_values=past_key_values, inputs_embeds=inputs_embeds, **kwargs)
            if inputs_embeds is not None and (past_key_values is None or past_key_values.get_seq_length() == 0):
                out.pop("input_ids", None)
                out["inputs_embeds"] = inputs_embeds
            return out

        lm.prepare_inputs_for_generation = embeds_first
        try:
            return lm.generate(inputs_embeds=self._embeds(pixel_values, input_ids), attention_mask=attention_mask,
                               **generate_kwargs)
        finally:
            del lm.prepare_inputs_for_generation

    # -- chat ---------------------------------------------------------------------------------

    def prompt(self, question, num_patches=1, history=None):
        """The InternLM2 chat prompt (as XTuner's InternVL dataset trains it) with the image in the
        first user turn."""
        if "<image>" not in question and num_patches:
            question = "<image>\n" + question
        image = IMG_START_TOKEN + IMG_CONTEXT_TOKEN * self.num_image_token * num_patches + IMG_END_TOKEN
        text = f"<|im_start|>system\n{self.config.system_message}<|im_end|>" if self.config.system_message else ""
        for old_q, old_a in history or []:
            text += f"<|im_start|>user\n{old_q}<|im_end|><|im_start|>assistant\n{old_a}<|im_end|>"
        text += f"<|im_start|>user\n{question}<|im_end|><|im_start|>assistant\n"
        return text.replace("<image>", image, 1)

    def chat(self, tokenizer, pixel_values, question, generation_config, history=None, return_history=False,
             verbose=False):
        """Answer `question` about the image tiles `pixel_values` (n, 3, H, W), as InternVL's chat()."""
        self.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        num_patches = 0 if pixel_values is None else pixel_values.shape[0]
        query = self.prompt(question, num_patches, history)
        inputs = tokenizer(query, return_tensors="pt")
        eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        gen = GenerationConfig(**{"eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id or eos,
                                  **dict(generation_config)})
        out = self.generate(pixel_values=pixel_values, input_ids=inputs["input_ids"].to(self.device),
                            attention_mask=inputs["attention_mask"].to(self.device), generation_config=gen)
        response = tokenizer.decode(out[0], skip_special_tokens=True).split("<|im_end|>")[0].strip()
        if verbose:
            print(query.replace(IMG_CONTEXT_TOKEN * self.num_image_token, "<IMG_CONTEXT>*N"), response)
        return (response, (history or []) + [(question, response)]) if return_history else response
