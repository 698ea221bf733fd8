"""Tokenizers behind one small interface: encode, decode, bos_id, eos_id, vocab_size."""

from __future__ import annotations

import dataclasses
import os

from wa.data.paths import DataError, third_party


@dataclasses.dataclass
class SentencePiece:
    path: str
    model: bytes | None = dataclasses.field(default=None, repr=False)   # a serialized ModelProto instead of a file

    def __post_init__(self):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_proto=self.model) if self.model is not None else \
            spm.SentencePieceProcessor(model_file=self.path)
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def save(self, file: str):
        """The model as a ``tokenizer.model`` file (a vocabulary rebuilt from GGUF metadata has no file of its own)."""
        with open(file, "wb") as f:
            f.write(self.sp.serialized_model_proto())

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


class HF:
    """Any ``transformers`` tokenizer; BOS/EOS are the model's own special tokens, if any."""

    def __init__(self, tok):
        self.tok = tok
        self.bos_id = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
        self.eos_id = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        self.vocab_size = len(tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])


class Bytes:
    """UTF-8 bytes 0..255, BOS 256, EOS 257."""
    bos_id, eos_id, vocab_size = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if i < 256).decode("utf-8", errors="replace")


def gpt2() -> HF:
    from transformers import GPT2TokenizerFast
    # from_pretrained reads vocab.json and merges.txt under transformers 4.x and 5.x alike (5.x's constructor no
    # longer takes file names: given vocab_file it builds an empty vocabulary).
    return HF(GPT2TokenizerFast.from_pretrained(third_party("gpt2-tokenizer"), local_files_only=True))


# Written beside a checkpoint whose tokenizer has no files of its own (``bytes``, ``gpt2``): {"type": name}.
MARKER = "wa_tokenizer.json"


def get(name_or_path: str):
    """``gpt2``, ``bytes``, a SentencePiece ``.model`` file, or a checkpoint directory."""
    if name_or_path == "gpt2":
        return gpt2()
    if name_or_path == "bytes":
        return Bytes()
    if os.path.isfile(name_or_path) and name_or_path.endswith(".model"):
        return SentencePiece(name_or_path)
    if os.path.isfile(name_or_path) and name_or_path.endswith(".gguf"):  # the vocabulary in the file's metadata
        from wa.models import gguf_io
        f = gguf_io.open_file(name_or_path)
        proto = f.sentencepiece_model()
        return SentencePiece(name_or_path, proto) if proto is not None else HF(f.tokenizer())
    if os.path.isdir(name_or_path):
        sp = os.path.join(name_or_path, "tokenizer.model")
        if os.path.exists(sp):
            return SentencePiece(sp)
        marker = os.path.join(name_or_path, MARKER)
        if os.path.exists(marker):  # written by launch.train_lm for tokenizers without files
            import json
            with open(marker) as f:
                return get(json.load(f)["type"])
        from transformers import AutoTokenizer
        try:
            return HF(AutoTokenizer.from_pretrained(name_or_path, local_files_only=True))
        except (OSError, ValueError) as e:
            raise DataError(f"{name_or_path}: no tokenizer found ({e})") from e
    raise DataError(f"tokenizer {name_or_path!r}: expected 'gpt2', 'bytes', a .model or .gguf file or a "
                    "checkpoint directory")


def piece(tok, i: int) -> str:
    """Token ``i``'s own text, with the space it opens a word with (decoding one token alone drops it in
    SentencePiece vocabularies): the text it adds after a fixed anchor token."""
    anchor = getattr(tok, "_piece_anchor", None)
    if anchor is None:
        ids = tok.encode("a")
        anchor = tok._piece_anchor = (ids[-1], tok.decode([ids[-1]])) if ids else (None, "")
    a, text = anchor
    if a is None:
        return tok.decode([int(i)])
    both = tok.decode([a, int(i)])
    return both[len(text):] if both.startswith(text) else tok.decode([int(i)])
