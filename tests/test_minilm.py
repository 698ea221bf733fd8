import os

import numpy as np
import pytest

from tests import helpers
from wa import models
from wa.data import paths, tokenizers


@pytest.fixture(scope="module")
def minilm():
    return models.load(paths.minilm())


def test_minilm_outputs_equal_transformers_pytorch_bert(minilm):
    # Reference: transformers' BertModel on the same files (tests/fixtures/make_decoder_fixtures.py --minilm).
    ref = np.load(os.path.join(helpers.REPO, "tests", "fixtures", "minilm_reference.npz"))
    hidden, pooled = minilm.forward(minilm.params, ref["ids"], ref["mask"])[:2]
    real = ref["mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[real], ref["hidden"][real], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(pooled), ref["pooled"], rtol=1e-4, atol=1e-5)
    assert sum(v.size for v in helpers.flat(minilm.params).values()) == 22_713_216


def test_minilm_sentence_similarity(minilm):
    tok = tokenizers.get(paths.minilm()).tok
    b = tok(["A man is eating food.", "A man is eating a piece of bread."], padding=True, return_tensors="np")
    h = np.asarray(minilm.forward(minilm.params, b["input_ids"], b["attention_mask"])[0])
    m = b["attention_mask"][..., None]
    e = (h * m).sum(1) / m.sum(1)
    e /= np.linalg.norm(e, axis=-1, keepdims=True)
    assert abs(float(e[0] @ e[1]) - 0.755) < 0.002


def test_minilm_taxonomy(minilm):
    counts = {}
    for p in helpers.flat(minilm.params):
        info = minilm.describe(p)
        counts[info.component] = counts.get(info.component, 0) + 1
    assert counts == {"embedding": 3, "norm": 26, "attention": 48, "mlp": 24, "head": 2}
