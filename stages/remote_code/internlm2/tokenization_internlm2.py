"""InternLM2's tokenizer as a model directory carries it: a SentencePiece model (`tokenizer.model`)
behind `AutoTokenizer` through `auto_map` and remote code (the project's own; XTuner does not ship
InternLM2's tokenizer code).

What it shares with internlm2-chat's `InternLM2Tokenizer`: the file layout (`tokenizer.model`,
`tokenizer_config.json` with `auto_map`), a slow (Python) tokenizer over SentencePiece, `<s>` in
front of every encoded text and no `</s>` after it, byte fallback (`<0x..>` pieces), the chat tokens
as pieces of the SentencePiece model and special tokens of the tokenizer, decoding with `▁` as a
space. What differs: no fast tokenizer class in `auto_map` (internlm2-chat has one), and the model is
trained on the project's text with `add_dummy_prefix` off.
"""
import os
import shutil
from typing import Any, Dict, List, Optional, Tuple

import sentencepiece as spm
from transformers.tokenization_utils import PreTrainedTokenizer

VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model"}
SPACE = "\u2581"


class InternLM2Tokenizer(PreTrainedTokenizer):
    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, unk_token: str = "<unk>", bos_token: str = "<s>", eos_token: str = "</s>",
                 pad_token: str = "</s>", add_bos_token: bool = True, add_eos_token: bool = False,
                 sp_model_kwargs: Optional[Dict[str, Any]] = None, **kwargs: Any) -> None:
        self.vocab_file = vocab_file
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.sp_model_kwargs = sp_model_kwargs or {}
        self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        self.sp_model.Load(vocab_file)
        super().__init__(unk_token=unk_token, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
                         add_bos_token=add_bos_token, add_eos_token=add_eos_token,
                         sp_model_kwargs=self.sp_model_kwargs, **kwargs)

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state["sp_model"] = None
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        self.sp_model.Load(self.vocab_file)

    @property
    def vocab_size(self) -> int:
        return self.sp_model.GetPieceSize()

    def get_vocab(self) -> Dict[str, int]:
        vocab = {self.sp_model.IdToPiece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs: Any) -> List[str]:
        return self.sp_model.EncodeAsPieces(text)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.PieceToId(token)

    def _convert_id_to_token(self, index: int) -> str:
        # An id past the pieces (a model whose embedding has more rows than this vocabulary, as a
        # random model of a real shape over the stand-in's tokenizer) decodes as <unk>, not an error.
        if not 0 <= index < self.sp_model.GetPieceSize():
            return self.unk_token
        return self.sp_model.IdToPiece(index)

    def convert_tokens_to_string(self, tokens: List[str]) -> str:
        """Pieces back to text: runs of ordinary pieces through SentencePiece (which joins byte pieces
        and turns `▁` into spaces), special tokens as they are."""
        out, run = [], []
        for token in tokens:
            if token in self.all_special_tokens:
                out.append(self.sp_model.DecodePieces(run) + token)
                run = []
            else:
                run.append(token)
        out.append(self.sp_model.DecodePieces(run))
        return "".join(out)

    def build_inputs_with_special_tokens(self, token_ids_0: List[int],
                                         token_ids_1: Optional[List[int]] = None) -> List[int]:
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        out = bos + token_ids_0 + eos
        if token_ids_1 is not None:
            out += bos + token_ids_1 + eos
        return out

    def get_special_tokens_mask(self, token_ids_0: List[int], token_ids_1: Optional[List[int]] = None,
                                already_has_special_tokens: bool = False) -> List[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask += bos + [0] * len(token_ids_1) + eos
        return mask

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None) -> Tuple[str]:
        if not os.path.isdir(save_directory):
            raise ValueError(f"{save_directory}: not a directory")
        out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model")
        if os.path.abspath(self.vocab_file) != os.path.abspath(out):
            if os.path.isfile(self.vocab_file):
                shutil.copyfile(self.vocab_file, out)
            else:
                with open(out, "wb") as f:
                    f.write(self.sp_model.serialized_model_proto())
        return (out,)
