import numpy as np
import pytest

from wa.data import text, tokenizers


def test_lm_windows_predict_every_token_once():
    stream = np.arange(1, 12, dtype=np.int32)  # 11 tokens -> 10 targets
    ids, mask = text.lm_windows(stream, 4)    # stride 3
    assert ids.tolist() == [[1, 2, 3, 4], [4, 5, 6, 7], [7, 8, 9, 10], [10, 11, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    targets = [int(ids[w, t + 1]) for w in range(len(ids)) for t in range(3) if mask[w, t + 1]]
    assert targets == list(range(2, 12))
    with pytest.raises(text.DataError, match="seq_len must be at least 2"):
        text.lm_windows(stream, 1)


def test_lm_windows_with_bos_in_every_window_predict_every_token_once():
    stream = np.arange(1, 12, dtype=np.int32)  # 11 tokens, every one a target
    ids, mask = text.lm_windows(stream, 4, bos_id=99)
    assert ids.tolist() == [[99, 1, 2, 3], [99, 4, 5, 6], [99, 7, 8, 9], [99, 10, 11, 0]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]]
    targets = [int(ids[w, t + 1]) for w in range(len(ids)) for t in range(3) if mask[w, t + 1]]
    assert targets == list(range(1, 12))


def test_document_splits():
    t = "Once upon a time, a cat.\n\nThe cat sat.\n\n\nOnce there was a dog.\nIt ran.\n"
    assert text.documents(t, "blank_lines") == ["Once upon a time, a cat.", "The cat sat.",
                                                "Once there was a dog.\nIt ran."]
    assert text.documents(t, "stories") == ["Once upon a time, a cat.\nThe cat sat.",
                                            "Once there was a dog.\nIt ran."]
    assert text.documents("a<|endoftext|>b", "endoftext") == ["a", "b"]
    with pytest.raises(text.DataError, match="unknown document split 'words'"):
        text.documents(t, "words")


def test_tokenizers():
    assert tokenizers.get("gpt2").encode("Hello world") == [15496, 995]
    b = tokenizers.get("bytes")
    assert b.decode(b.encode("héllo")) == "héllo" and b.bos_id == 256
    from wa.data import paths
    sp = tokenizers.get(paths.stories260k())
    assert sp.vocab_size == 512 and sp.bos_id == 1 and sp.eos_id == 2
    stream = text.token_stream(["Hi.", "Yo."], sp)
    assert stream[0] == 1 and list(stream).count(1) == 2


def test_corpora_are_vendored():
    for name in text.CORPORA:
        assert len(text.read(name)) > 1000
