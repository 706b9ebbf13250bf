"""The tokenizer of a GGUF file: byte-level BPE from ``tokenizer.json``, with the llama.cpp pre-tokenizer whose
regexes split text the way the Hugging Face tokenizer does.

llama.cpp's converter picks ``tokenizer.ggml.pre`` by hashing the token ids of a probe text and looking the hash up
in a table of known tokenizers; a tokenizer it has not seen ("BPE pre-tokenizer was not recognized") cannot be
converted. We read the pre-tokenizer from ``tokenizer.json`` instead and name the llama.cpp pre-tokenizer with the
same regexes:

* ``ByteLevel(use_regex=True)`` alone: GPT-2's regex -> ``gpt-2``;
* ``Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)]`` (each digit its own piece, then GPT-2's
  regex; the test-bed models): llama.cpp's ``\\p{N}`` + GPT-2 pair, named ``smollm`` when the tokenizer does not
  clean up spaces on decode and ``refact`` when it does (the two differ only in that flag).

Anything else is refused with its pre-tokenizer named. Merges, special-token ids and the add-BOS/EOS flags come
from the ``gguf`` package's ``SpecialVocab`` (the converter's own reader); token types mark special added tokens
CONTROL and other added tokens USER_DEFINED.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf

from moecompress.errors import CheckpointError, UnsupportedModelError


@dataclass
class TokenizerMetadata:
    pre: str
    tokens: list[str]
    token_types: list[int]
    special_vocab: gguf.SpecialVocab
    add_bos: bool
    add_eos: bool

    def write(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        self.special_vocab.add_to_gguf(writer, quiet=True)
        # written explicitly: llama.cpp's defaults for these differ between pre-tokenizers
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)


def _describe(pre_tokenizer: dict | None) -> str:
    if not pre_tokenizer:
        return "none"
    if pre_tokenizer.get("type") == "Sequence":
        return "Sequence[" + ", ".join(_describe(part) for part in pre_tokenizer.get("pretokenizers", [])) + "]"
    return str(pre_tokenizer.get("type"))


def _is_byte_level_regex(part: dict) -> bool:
    return part.get("type") == "ByteLevel" and part.get("use_regex", True) and not part.get("add_prefix_space", False)


def llama_pre_tokenizer(tokenizer: dict, clean_spaces: bool) -> str:
    """The ``tokenizer.ggml.pre`` name whose regexes match ``tokenizer.json``'s pre-tokenizer (see the module
    docstring); UnsupportedModelError for any other."""
    pre = tokenizer.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if tokenizer.get("normalizer") is None:
        if len(parts) == 1 and _is_byte_level_regex(parts[0]):
            return "gpt-2"
        if (len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits")
                and _is_byte_level_regex(parts[1])):
            return "refact" if clean_spaces else "smollm"
    raise UnsupportedModelError(
        f"tokenizer pre-tokenizer {_describe(pre)} (normalizer {_describe(tokenizer.get('normalizer'))}) has no "
        "llama.cpp pre-tokenizer we can name with the same regexes; GGUF export supports GPT-2 byte-level BPE "
        "with or without individual digits")


def tokenizer_metadata(folder: Path, vocab_size: int = 0) -> TokenizerMetadata:
    """Read ``folder/tokenizer.json`` (+ ``tokenizer_config.json``, ``config.json``); CheckpointError when there is
    none, UnsupportedModelError for a tokenizer llama.cpp's BPE cannot reproduce. The token list is padded with
    ``[PAD{id}]`` (UNUSED) up to ``vocab_size``, the embedding's rows, as llama.cpp needs one token per row."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no tokenizer.json; a GGUF file carries its tokenizer, so save the "
                              "tokenizer into the folder (tokenizer.save_pretrained) and export again")
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or (tokenizer.get("decoder") or {}).get("type") != "ByteLevel":
        raise UnsupportedModelError(f"{path}: a {model.get('type')} tokenizer (decoder "
                                    f"{(tokenizer.get('decoder') or {}).get('type')}); GGUF export writes byte-level BPE "
                                    "tokenizers (llama.cpp's gpt2 model)")
    config_path = Path(folder) / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    pre = llama_pre_tokenizer(tokenizer, bool(tokenizer_config.get("clean_up_tokenization_spaces", False)))

    by_id = {int(index): text for text, index in model["vocab"].items()}
    types = {index: gguf.TokenType.NORMAL for index in by_id}
    for added in tokenizer.get("added_tokens", []):
        by_id[int(added["id"])] = added["content"]
        types[int(added["id"])] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    size = max(max(by_id) + 1, vocab_size)
    tokens = [by_id.get(index, f"[PAD{index}]") for index in range(size)]
    token_types = [int(types.get(index, gguf.TokenType.UNUSED)) for index in range(size)]

    special_vocab = gguf.SpecialVocab(folder, load_merges=True, n_vocab=size)
    if not special_vocab.merges:
        raise CheckpointError(f"{path} has no merges; a byte-level BPE tokenizer needs them")
    # whether encoding adds BOS / EOS, as SpecialVocab read it (tokenizer_config flags, the post-processor); False
    # when neither says so: the Hugging Face tokenizer then adds nothing
    add_bos = bool(special_vocab.add_special_token.get("bos", False))
    add_eos = bool(special_vocab.add_special_token.get("eos", False))
    return TokenizerMetadata(pre, tokens, token_types, special_vocab, add_bos, add_eos)
