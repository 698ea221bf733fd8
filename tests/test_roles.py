import jax.numpy as jnp
import numpy as np
import pytest

from wa.esa import roles


def test_token_categories():
    assert [roles.category(p, prev) for p, prev in [
        ("\n", ""), ("<s>", ""), (",", " dog"), (" 42", " was"), (" the", " saw"), (" Lily", " saw"),
        (" Lily", "."), (" Once", ""), ("ing", " play"), (" dog", " the")]] == [
        "newline/BOS", "newline/BOS", "punctuation", "number", "function word", "name", "word start", "word start",
        "word piece", "word start"]


def test_head_statistics_of_planted_patterns():
    # Four heads on one window whose tokens repeat: the previous token, the first position, the token after the
    # latest earlier occurrence of the current one (itself where there is none), uniform.
    ids = np.array([[5, 1, 2, 3, 1, 2, 3, 1]])
    t = ids.shape[1]
    p = np.zeros((1, 4, t, t), np.float32)
    for q in range(t):
        p[0, 0, q, max(q - 1, 0)] = 1
        p[0, 1, q, 0] = 1
        earlier = [j for j in range(q - 1) if ids[0, j] == ids[0, q]]
        p[0, 2, q, earlier[-1] + 1 if earlier else q] = 1
        p[0, 3, q, :q + 1] = 1 / (q + 1)
    sums, n_q, n_has = roles._head_sums(jnp.asarray(p), jnp.asarray(ids), jnp.ones((1, t)))
    assert float(n_q) == 7 and float(n_has) == 4          # queries 1..7; tokens 4..7 occurred before
    np.testing.assert_allclose(np.asarray(sums["prev"]) / 7, [1, 1 / 7, 0, sum(1 / (q + 1) for q in range(1, t)) / 7],
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sums["first"]) / 7, [1 / 7, 1, 0, sum(1 / (q + 1) for q in range(1, t)) / 7],
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sums["induction"])[2] / 4, 1.0)
    np.testing.assert_allclose(np.asarray(sums["entropy"])[3] / 7, 1.0, rtol=1e-6)
    stats = {"heads": {0: {"prev": np.asarray(sums["prev"]) / 7, "first": np.asarray(sums["first"]) / 7,
                           "self": np.asarray(sums["self"]) / 7, "induction": np.asarray(sums["induction"]) / 4,
                           "entropy": np.asarray(sums["entropy"]) / 7, "offset_max": np.zeros(4),
                           "offset_arg": np.full(4, 2), "local": np.zeros(4)}}}
    assert [roles.head_class(stats, 0, h)[0] for h in range(4)] == ["previous-token", "BOS/sink", "induction",
                                                                    "broad"]


def test_neuron_labels_need_a_dominant_token_or_an_enriched_category():
    ids = np.array([[7, 3, 7, 4, 7, 5, 6, 8]])
    cats = np.array([[1, 6, 1, 6, 1, 6, 6, 6]])            # punctuation is 3 of 8 tokens
    piece = {3: "a", 4: "b", 5: "c", 6: "d", 7: ",", 8: "e"}.get

    def stats(positions):
        return {"neurons": {0: (np.arange(len(positions), 0, -1)[None].astype(float), np.array([positions]))},
                "seq_len": 8}
    label, rows = roles.neuron_label(stats([0, 2, 4, 1]), 0, 0, ids, cats, piece)
    assert label == "token detector: ','" and rows[0]["token"] == "," and rows[1]["context"] == ",a,"
    # Word pieces are 5 of 8 tokens: 3 of 4 top activations is not twice their share.
    assert roles.neuron_label(stats([1, 3, 5, 0]), 0, 0, ids, cats, piece)[0] is None


@pytest.fixture(scope="module")
def smoke_roles(smoke_scored):
    from wa.esa import roles_report
    cfg, s, sc, sel = smoke_scored
    return cfg, s, roles_report.study(s, sc, sel, progress=False)


def test_units_of_stories260k_weights(smoke_roles):
    _, s, _ = smoke_roles
    unit = lambda p, *c: roles.unit_of(s.loaded, p, np.ravel_multi_index(c, s.flat[p].shape), s.flat[p].shape)  # noqa: E731
    a, m = "model/layers/2/self_attn/", "model/layers/3/mlp/"
    # 8 query heads and 4 key-value heads of 8 dimensions; 172 neurons; 512 tokens. Kernels are [in, out].
    assert unit(a + "q_proj/kernel", 5, 17) == ("head", 2, 2) and unit(a + "o_proj/kernel", 17, 5) == ("head", 2, 2)
    assert unit(a + "k_proj/kernel", 0, 31) == ("kv_head", 2, 3)
    assert unit(a + "v_proj/kernel", 9, 8) == ("kv_head", 2, 1)
    assert unit(m + "gate_proj/kernel", 3, 100) == ("neuron", 3, 100) == unit(m + "down_proj/kernel", 100, 3)
    assert unit("lm_head/kernel", 3, 300) == ("token", None, 300)
    assert unit("model/layers/0/input_layernorm/weight", 3) is None


def test_the_roles_study_on_stories260k_writes_its_report(smoke_roles, tmp_path):
    from wa.esa import roles_report
    cfg, s, res = smoke_roles
    assert len(res["heads"]) == 5 * 8 and {v["class"] for v in res["heads"].values()} <= \
        {n for n, _, _ in roles.HEAD_CLASSES} | {"unclassified"}
    for m in ("magnitude", "grad_x_weight"):
        t = res["top"][m]
        assert len(t["weights"]) == 20 and sum(t["by_kind"].values()) == 20
        assert t["share_named"] == sum(bool(w["role"]) for w in t["weights"]) / 20
        loc = res["localisation"][m]
        counted = [c for c in roles.CATEGORIES if res["target_categories"][c]]
        assert sum(loc["topk"][c]["tokens"] for c in counted) == res["eval_tokens"]
        # One super-weight candidate per down projection (5 layers); the top-k is also zeroed without them.
        assert 0 <= loc["super_in_topk"] <= 5 and set(loc["topk_without_super"]) == set(roles.CATEGORIES)
        f = res["facts"][m]
        assert set(f) == {"topk", "topk_without_super", "random_k"} and 0 <= f["topk"]["first_token_top1"] <= 1
    assert res["super_weights"]["candidates"] == 5
    b = res["facts"]["base"]
    assert len(b["per_fact_nll"]) == len(roles.FACTS) and b["answer_nll"] == pytest.approx(np.mean(b["per_fact_nll"]),
                                                                                           abs=1e-4)
    files = roles_report.write(str(tmp_path), cfg, res, 1.0)
    assert all((tmp_path / f).exists() for f in files)
    md = (tmp_path / "roles.md").read_text()
    assert "## Knowledge localisation" in md and "## Factual recall" in md and "Super-weight candidates" in md


def test_fact_windows_mark_the_answer_tokens():
    from wa.data import tokenizers
    tok = tokenizers.get("bytes")
    ids, mask, ans = roles.fact_windows(tok, True, (("ab", " c"), ("x", " yz")))
    assert ids.tolist() == [[256, 97, 98, 32, 99], [256, 120, 32, 121, 122]] and mask.all()
    assert ans.tolist() == [[False, False, False, True, True], [False, False, True, True, True]]
    ids, mask, ans = roles.fact_windows(tok, False, (("ab", " c"), ("x", " y")))
    assert ids.tolist() == [[97, 98, 32, 99], [120, 32, 121, 0]] and mask[1].tolist() == [1, 1, 1, 0]
    assert ans.tolist() == [[False, False, True, True], [False, True, True, False]]
