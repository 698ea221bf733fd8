import os

import numpy as np
import pytest

from tests import helpers
from wa import models
from wa.data import paths, tokenizers
from wa.models import llama2c, sampling

SRC = os.path.join(helpers.REPO, "third_party", "stories260k", "llama2c")


@pytest.fixture(scope="module")
def stories():
    return models.load(paths.stories260k())


def test_greedy_from_bos_matches_llama2c_golden(stories):
    tok = tokenizers.get(paths.stories260k())
    ids = sampling.greedy(stories, stories.params, [tok.bos_id], 256)
    with open(os.path.join(SRC, "golden.txt")) as f:
        golden = f.read()
    assert tok.decode(ids[1:]) == golden


def test_converter_reproduces_vendored_checkpoint(tmp_path, stories):
    out = llama2c.convert(os.path.join(SRC, "stories260K.bin"), os.path.join(SRC, "tok512.model"),
                          str(tmp_path / "hf"))
    fresh = models.load(out)
    a, b = helpers.flat(fresh.params), helpers.flat(stories.params)
    assert a.keys() == b.keys() and len(a) == 48
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
    assert sum(v.size for v in a.values()) == 292_800
    assert fresh.config.num_key_value_heads == 4 and fresh.config.tie_word_embeddings is False
    # The shared classifier is stored twice, as embedding and as its transpose.
    np.testing.assert_array_equal(np.asarray(a["lm_head/kernel"]), np.asarray(a["model/embed_tokens/embedding"]).T)


def test_rotary_permutation_maps_interleaved_to_half_split():
    # One head of dimension 4: rows (0,1) and (2,3) are rotary pairs in llama2.c;
    # HF pairs row i with row i + 2, so the new order is 0, 2, 1, 3.
    w = np.arange(8, dtype=np.float32).reshape(4, 2)
    np.testing.assert_array_equal(llama2c._permute_rotary(w, 1), w[[0, 2, 1, 3]])


def test_truncated_llama2c_file_is_rejected(tmp_path):
    data = open(os.path.join(SRC, "stories260K.bin"), "rb").read()
    bad = tmp_path / "cut.bin"
    bad.write_bytes(data[:-100])
    with pytest.raises(llama2c.Llama2cError, match="cut.bin.*bytes of weights"):
        llama2c.read(str(bad))
