"""Text corpora: vendored files, split into documents, tokenized into LM windows."""

from __future__ import annotations

import os
import re

import numpy as np

from wa.data.paths import DataError, third_party

CORPORA = {
    "tinystories": ("tinystories", "validation.txt"),
    "tinystories_sample": ("tinystories", "sample.txt"),
    "tinyshakespeare": ("tinyshakespeare", "input.txt"),
    "wikitext2_valid": ("wikitext-2", "valid.txt"),
    "wikitext2_test": ("wikitext-2", "test.txt"),
}


def corpus_path(name_or_path: str) -> str:
    if name_or_path in CORPORA:
        return third_party(*CORPORA[name_or_path])
    if os.path.isfile(name_or_path):
        return name_or_path
    if os.path.isdir(name_or_path):
        raise DataError(f"corpus {name_or_path!r} is a directory; expected a text file or one of "
                        f"{', '.join(CORPORA)}")
    raise DataError(f"corpus {name_or_path!r} is neither a known corpus ({', '.join(CORPORA)}) "
                    "nor an existing text file")


def read(name_or_path: str) -> str:
    path = corpus_path(name_or_path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"corpus {path} is not UTF-8 text (byte {e.start}: {e.reason}); expected a text file") from None
    if not text.strip():
        raise DataError(f"corpus {path} is empty")
    return text


# A TinyStories story almost always opens with one of these; its other paragraphs do not.
STORY_START = re.compile(r"(Once upon a time|Once there (was|were|lived)|Once,? (in|on|there))")


def documents(text: str, split: str = "blank_lines") -> list[str]:
    """Splits a corpus into documents.

    ``stories``: TinyStories without end-of-text markers; blank-line paragraphs are grouped
    into stories, a new one starting at each paragraph that opens like a story ("Once upon a
    time", "Once there was", ...), and a story's paragraphs are joined by one newline.
    ``blank_lines``: every paragraph (separated by empty lines) is a document; ``endoftext``:
    ``<|endoftext|>`` markers; ``lines``: one document per non-empty line; ``none``: one document.
    """
    if split == "stories":
        docs = []
        for para in documents(text, "blank_lines"):
            if not docs or STORY_START.match(para):
                docs.append(para)
            else:
                docs[-1] += "\n" + para
        return docs
    if split == "blank_lines":
        docs = re.split(r"\n\s*\n", text)
    elif split == "endoftext":
        docs = text.split("<|endoftext|>")
    elif split == "lines":
        docs = text.splitlines()
    elif split == "none":
        docs = [text]
    else:
        raise DataError(f"unknown document split {split!r}; use stories, blank_lines, endoftext, lines or none")
    return [d.strip() for d in docs if d.strip()]


def token_stream(docs: list[str], tokenizer, bos: bool = True, eos: bool = False) -> np.ndarray:
    """One int32 stream: each document's tokens, preceded by BOS / followed by EOS if asked."""
    parts = []
    for d in docs:
        ids = tokenizer.encode(d)
        if bos and tokenizer.bos_id is not None:
            ids = [tokenizer.bos_id] + ids
        if eos and tokenizer.eos_id is not None:
            ids = ids + [tokenizer.eos_id]
        parts.append(np.asarray(ids, np.int32))
    return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def lm_windows(stream: np.ndarray, seq_len: int, bos_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Windows of ``seq_len`` tokens with a stride of ``seq_len - 1``.

    Consecutive windows share one token, so every token of the stream but the first is a
    prediction target exactly once; context resets at each window start. With ``bos_id``, each
    window is instead BOS followed by the next ``seq_len - 1`` tokens of the stream, so every token
    of the stream is a target exactly once, each predicted from a context that starts at BOS (what
    models such as Gemma, trained always to see BOS first, need). The last window is right-padded;
    the returned mask is 1 on real tokens.
    """
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")
    if len(stream) < (1 if bos_id is not None else 2):
        raise DataError(f"token stream of {len(stream)} tokens has nothing to predict")
    stride = seq_len - 1
    lead = np.asarray([] if bos_id is None else [bos_id], np.int32)
    n = -(-(len(stream) - 1 + len(lead)) // stride)
    ids = np.zeros((n, seq_len), np.int32)
    mask = np.zeros((n, seq_len), np.int32)
    for i in range(n):
        piece = np.concatenate([lead, stream[i * stride:i * stride + seq_len - len(lead)]])
        ids[i, :len(piece)] = piece
        mask[i, :len(piece)] = 1
    return ids, mask


def disjoint_windows(stream: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The pruning papers' test windows (SparseGPT's and Wanda's ``eval_ppl``): the stream cut into consecutive,
    non-overlapping windows of ``seq_len`` tokens, the incomplete tail dropped; in each window every token but the
    first is a prediction target. Mask all ones."""
    n = len(stream) // seq_len
    if n < 1:
        raise DataError(f"token stream of {len(stream)} tokens holds no window of {seq_len}")
    ids = np.asarray(stream[:n * seq_len], np.int32).reshape(n, seq_len)
    return ids, np.ones_like(ids)
