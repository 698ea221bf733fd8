import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wa.esa import perturb, select, stats


def _scores():
    return {"a/kernel": jnp.asarray([[5.0, 1.0, 3.0], [3.0, 0.5, 9.0]]),
            "b/kernel": jnp.asarray([7.0, 3.0, 3.0, 2.0]),
            "b/scale": jnp.asarray([100.0, 100.0])}


def test_per_layer_topk_ties_go_to_the_lower_index():
    sel, vals = select.top_k(_scores(), 2)
    assert sel["a/kernel"].tolist() == [5, 0] and vals["a/kernel"].tolist() == [9.0, 5.0]
    assert sel["b/kernel"].tolist() == [0, 1]          # 3.0 at indices 1 and 2: index 1 wins
    assert "b/scale" not in sel                        # the default filter keeps kernels only


def test_k_above_a_layer_size_takes_the_whole_layer_and_fractions_round_up():
    sel, _ = select.top_k(_scores(), 5)
    assert sorted(sel["b/kernel"].tolist()) == [0, 1, 2, 3] and len(sel["a/kernel"]) == 5
    sel, _ = select.top_k(_scores(), 0.2)              # ceil(0.2 * 6) = 2, ceil(0.2 * 4) = 1
    assert len(sel["a/kernel"]) == 2 and len(sel["b/kernel"]) == 1


def test_global_topk_and_bottomk():
    sel, vals = select.top_k(_scores(), 3, mode="global")
    assert select.as_set(sel) == {("a/kernel", 5), ("b/kernel", 0), ("a/kernel", 0)}
    # Three-way tie at 3.0 for the fourth place: the earlier tensor, then the lower index.
    sel4, _ = select.top_k(_scores(), 4, mode="global")
    assert ("a/kernel", 2) in select.as_set(sel4)
    low, lv = select.top_k(_scores(), 2, mode="global", largest=False)
    assert select.as_set(low) == {("a/kernel", 4), ("a/kernel", 1)}
    assert sorted(v for vals in lv.values() for v in vals) == [0.5, 1.0]


def _reference_global(scores, k, signed, largest):
    """Every key sorted on the host: best first, ties to the earlier path, then the lower index."""
    rows = [(-(abs(float(v)) if signed else float(v)) if largest else (abs(float(v)) if signed else float(v)), pi, i)
            for pi, p in enumerate(scores) for i, v in enumerate(np.ravel(np.asarray(scores[p])))]
    rows.sort()
    paths = list(scores)
    out = {}
    for _, pi, i in rows[:k]:
        out.setdefault(paths[pi], []).append(i)
    return out


@pytest.mark.parametrize("on_device", [True, False])
@pytest.mark.parametrize("signed,largest", [(False, True), (True, True), (False, False), (True, False)])
def test_global_topk_equals_a_full_host_sort(signed, largest, on_device):
    rng = np.random.default_rng(0)
    # Few distinct values (many ties at every threshold), negatives, signed zeros, tensors of different shapes.
    scores = {"a/kernel": jnp.asarray(rng.integers(-3, 4, (7, 5)).astype(np.float32)),
              "b/kernel": jnp.asarray(np.array([0.0, -0.0, 2.5, -2.5, 1e-30, -1e-30, 3.0], np.float32)),
              "c/kernel": jnp.asarray(rng.standard_normal((3, 4, 6)).astype(np.float32))}
    n = sum(int(np.prod(v.shape)) for v in scores.values())
    for k in (1, 2, 5, 17, 40, n - 1, n):
        sel, vals = select.top_k(scores, k, mode="global", signed=signed, largest=largest, on_device=on_device)
        ref = _reference_global(scores, k, signed, largest)
        assert {p: v.tolist() for p, v in sel.items()} == ref, (k, signed, largest)
        for p, idx in sel.items():
            raw = np.ravel(np.asarray(scores[p]))[idx]
            np.testing.assert_array_equal(vals[p], np.abs(raw) if signed else raw)


def test_signed_scores_rank_by_magnitude():
    sel, _ = select.top_k({"w/kernel": jnp.asarray([1.0, -5.0, 2.0])}, 1, signed=True)
    assert sel["w/kernel"].tolist() == [1]


def test_selection_errors():
    with pytest.raises(select.SelectionError, match="topk must be positive, got 0"):
        select.top_k(_scores(), 0)
    with pytest.raises(select.SelectionError, match="topk must be positive, got -3"):
        select.top_k(_scores(), -3)
    with pytest.raises(select.SelectionError, match=r"param_filter 'attn/q\$' matches no parameter"):
        select.top_k(_scores(), 1, param_filter="attn/q$")
    with pytest.raises(select.SelectionError, match="mode must be 'per_layer' or 'global'"):
        select.top_k(_scores(), 1, mode="layer")


def test_random_k_is_seeded_uniform_and_sized_like_topk():
    s = {"w/kernel": jnp.zeros((100, 50))}
    a = select.random_k(s, 10, "per_layer", select.DEFAULT_FILTER, seed=1)
    b = select.random_k(s, 10, "per_layer", select.DEFAULT_FILTER, seed=1)
    c = select.random_k(s, 10, "per_layer", select.DEFAULT_FILTER, seed=2)
    assert a["w/kernel"].tolist() == b["w/kernel"].tolist() and select.jaccard(a, c) < 0.5
    assert len(set(a["w/kernel"].tolist())) == 10
    picks = np.concatenate([select.random_k(s, 50, "per_layer", select.DEFAULT_FILTER, seed=i)["w/kernel"]
                            for i in range(40)])
    # 2000 draws over 5000 slots in 10 bands of 500: each band near 200.
    hist = np.bincount(picks // 500, minlength=10)
    assert hist.min() > 140 and hist.max() < 260
    # Model-wide: k of all the matrices' weights together, shared out by chance (not per matrix).
    two = {"a/kernel": jnp.zeros((100, 50)), "b/kernel": jnp.zeros((10, 50))}
    g = [select.random_k(two, 0.1, "global", select.DEFAULT_FILTER, seed=i) for i in range(200)]
    assert {select.size(x) for x in g} == {550}
    assert all(len(set(x[p].tolist())) == len(x[p]) and x[p].max() < two[p].size for x in g for p in x)
    share_b = np.mean([len(x.get("b/kernel", ())) for x in g]) / 550
    assert abs(share_b - 500 / 5500) < 0.01


def test_jaccard_overlap_heavy_tail_counts():
    a = {"x": np.array([1, 2, 3])}
    b = {"x": np.array([2, 3, 4, 5])}
    assert select.jaccard(a, b) == 2 / 5 and select.overlap(a, b) == 2 / 3
    ht = select.heavy_tail({"w/kernel": jnp.concatenate([jnp.ones(999), jnp.asarray([1000.0])])})
    assert ht["n"] == 1000 and ht["top01pct_share"] == pytest.approx(1000 / 1999)
    assert ht["top1pct_mean_over_median"] == pytest.approx((1000 + 9) / 10)
    assert select.heavy_tail({"w/kernel": jnp.ones(10)})["gini"] == pytest.approx(0.0, abs=1e-12)
    from wa.models.families import ParamInfo
    c = select.counts({"l/0/q": np.arange(3), "l/1/up": np.arange(2)},
                      lambda p: ParamInfo(int(p.split("/")[1]), "attention" if p.endswith("q") else "mlp",
                                          p.split("/")[2]))
    assert c["component"] == {"attention": 3, "mlp": 2} and c["layer_component"] == {"0/attention": 3, "1/mlp": 2}


@pytest.mark.parametrize("case", ["lognormal", "ties_and_zeros", "signed", "one", "two"])
def test_heavy_tail_on_device_equals_the_host_sort(case):
    """The radix-histogram figures (as on an accelerator) against one sorted host copy: order statistics, top sums
    and the plot exact, the Gini coefficient within the bound it reports."""
    rng = np.random.default_rng(0)
    sc = {"lognormal": {"a/kernel": np.exp(rng.standard_normal((300, 200))),
                        "b/kernel": np.exp(2 * rng.standard_normal(1000))},
          "ties_and_zeros": {"a/kernel": rng.integers(0, 5, (400, 50)), "b/kernel": np.zeros(77)},
          "signed": {"a/kernel": rng.standard_normal((500, 40))},
          "one": {"a/kernel": np.array([3.0])}, "two": {"a/kernel": np.array([3.0, 1.0])}}[case]
    sc = {p: jnp.asarray(v, jnp.float32) for p, v in sc.items()}
    signed = case == "signed"
    host = select.heavy_tail(sc, r".", signed, on_device=False)
    dev = select.heavy_tail(sc, r".", signed, on_device=True)
    assert dev["n"] == host["n"] and dev["histogram"] == host["histogram"]
    for k in ("median", "max", "top01pct_share", "top1pct_mean_over_median"):
        assert dev[k] == pytest.approx(host[k], rel=1e-6), k
    assert abs(dev["gini"] - host["gini"]) <= dev["gini_error"] + 1e-12
    # Ties only (integers): every bin holds one value, so the Gini coefficient is exact.
    assert dev["gini_error"] < 1e-8 and (case not in ("ties_and_zeros", "one", "two") or dev["gini_error"] == 0)
    assert sum(dev["histogram"]["counts"]) == int(sum((np.abs(v) > 0).sum() for v in sc.values()))


def _params(dtype=jnp.float32):
    return {"w/kernel": jnp.arange(1, 13, dtype=jnp.float32).reshape(3, 4).astype(dtype)}


def test_sign_flip_twice_is_the_identity_and_touches_only_the_selection():
    p = _params()
    sel = {"w/kernel": np.array([0, 5, 11])}
    once = perturb.apply(p, sel, "sign_flip")
    assert np.asarray(once["w/kernel"]).ravel().tolist() == [-1, 2, 3, 4, 5, -6, 7, 8, 9, 10, 11, -12]
    twice = perturb.apply(once, sel, "sign_flip")
    np.testing.assert_array_equal(np.asarray(twice["w/kernel"]), np.asarray(p["w/kernel"]))


def test_zero_and_dose():
    p = _params()
    sel = {"w/kernel": np.array([1])}
    assert float(perturb.apply(p, sel, "zero")["w/kernel"][0, 1]) == 0.0
    assert float(perturb.apply(p, sel, "zero", scale=0.25)["w/kernel"][0, 1]) == 1.5
    assert float(perturb.apply(p, sel, "sign_flip", scale=0.5)["w/kernel"][0, 1]) == 0.0


def test_gauss_noise_is_scaled_by_the_layer_std():
    p = {"w/kernel": jnp.asarray(np.random.default_rng(0).normal(0, 3.0, 20000), jnp.float32)}
    sel = {"w/kernel": np.arange(20000)}
    out = perturb.apply(p, sel, "gauss_noise", scale=0.5, key=jax.random.key(1))
    d = np.asarray(out["w/kernel"]) - np.asarray(p["w/kernel"])
    assert abs(d.std() - 0.5 * float(jnp.std(p["w/kernel"]))) < 0.05
    rel = perturb.apply(p, sel, "gauss_noise", scale=0.5, key=jax.random.key(1), noise_ref="weight")
    r = (np.asarray(rel["w/kernel"]) - np.asarray(p["w/kernel"])) / np.abs(np.asarray(p["w/kernel"]))
    assert abs(r.std() - 0.5) < 0.02


@pytest.mark.parametrize("dtype,bit,expect", [(jnp.float32, 31, -3.0), (jnp.bfloat16, 15, -3.0),
                                              (jnp.float32, 30, 3.0 * 2.0 ** -128),
                                              (jnp.bfloat16, 14, 3.0 * 2.0 ** -128)])
def test_bit_flip_on_chosen_bits(dtype, bit, expect):
    p = {"w/kernel": jnp.asarray([1.0, 3.0], dtype)}
    out = perturb.apply(p, {"w/kernel": np.array([1])}, "bit_flip", bits=(bit,))
    assert out["w/kernel"].dtype == dtype
    assert float(out["w/kernel"][1]) == pytest.approx(expect) and float(out["w/kernel"][0]) == 1.0
    back = perturb.apply(out, {"w/kernel": np.array([1])}, "bit_flip", bits=(bit,))
    assert float(back["w/kernel"][1]) == 3.0


def test_bit_flip_in_the_bfloat16_encoding_of_float32_weights():
    # 1 + 2^-10 rounds to 1.0 in bfloat16 (7 mantissa bits): the flip acts on the rounded weight.
    p = {"w": jnp.asarray([1.0 + 2.0 ** -10, -0.75, 2.0], jnp.float32)}
    sel = {"w": np.array([0, 1, 2])}
    sign = perturb.apply(p, sel, "bit_flip", bits=(15,), encoding="bfloat16")
    assert sign["w"].dtype == jnp.float32 and np.asarray(sign["w"]).tolist() == [-1.0, 0.75, -2.0]
    mant = perturb.apply(p, sel, "bit_flip", bits=(6,), encoding="bfloat16")  # mantissa MSB: ± half the binade
    assert np.asarray(mant["w"]).tolist() == [1.5, -0.5, 3.0]
    expo = perturb.apply(p, sel, "bit_flip", bits=(14,), encoding="bfloat16")  # exponent MSB
    # 1 -> inf (exponent field 255); 2 = 2^(128-127) -> exponent field 0 -> 0.
    assert np.asarray(expo["w"]).tolist()[0] == float("inf") and np.asarray(expo["w"])[2] == 0.0
    with pytest.raises(perturb.PerturbError, match=r"bits \[16\] do not exist in bfloat16"):
        perturb.apply(p, sel, "bit_flip", bits=(16,), encoding="bfloat16")
    with pytest.raises(perturb.PerturbError, match="bit_flip encoding 'fp8'"):
        perturb.apply(p, sel, "bit_flip", bits=(1,), encoding="fp8")
    assert [perturb.bit_field(b, "bfloat16") for b in (15, 14, 9, 7, 6, 0)] == [
        "sign", "exponent MSB", "exponent 2", "exponent LSB", "mantissa MSB", "mantissa 0"]
    assert [perturb.bit_field(b, "float32") for b in (31, 30, 23, 22)] == [
        "sign", "exponent MSB", "exponent LSB", "mantissa MSB"]


@pytest.mark.parametrize("dtype,nbits", [(jnp.float32, 32), (jnp.bfloat16, 16)])
def test_random_bit_flips_hit_about_p_of_the_bits(dtype, nbits):
    x = jnp.asarray(np.random.default_rng(0).normal(size=4000), dtype)
    out = perturb.apply({"w": x}, {"w": np.arange(4000)}, "bit_flip", prob=0.05, key=jax.random.key(2))
    u = {2: np.uint16, 4: np.uint32}[jnp.dtype(dtype).itemsize]
    diff = np.asarray(jax.lax.bitcast_convert_type(x, u)) ^ np.asarray(jax.lax.bitcast_convert_type(out["w"], u))
    flipped = sum(int(b) for v in diff for b in bin(int(v))[2:])
    assert abs(flipped / (4000 * nbits) - 0.05) < 0.005


def test_perturb_errors():
    p = _params()
    sel = {"w/kernel": np.array([0])}
    with pytest.raises(perturb.PerturbError, match="unknown perturbation 'melt'"):
        perturb.apply(p, sel, "melt")
    with pytest.raises(perturb.PerturbError, match="perturb_scale must be >= 0, got -1"):
        perturb.apply(p, sel, "gauss_noise", scale=-1)
    with pytest.raises(perturb.PerturbError, match=r"bits \[16\] do not exist in bfloat16"):
        perturb.apply(_params(jnp.bfloat16), sel, "bit_flip", bits=(16,))


def test_a_perturbation_is_one_record(monkeypatch):
    # A new kind registered in PERTURBATIONS is checked, applied and described with no other change.
    halve = perturb.Perturbation("halve", lambda sel, flat, key, a: sel * (1 - a.scale / 2), "w(1-s/2)",
                                 "s = 1 halves")
    monkeypatch.setitem(perturb.PERTURBATIONS, "halve", halve)
    p = _params()
    out = perturb.apply(p, {"w/kernel": np.array([1, 3])}, "halve", scale=1.0)
    want = np.asarray(p["w/kernel"]).ravel().copy()
    want[[1, 3]] /= 2
    np.testing.assert_array_equal(np.asarray(out["w/kernel"]).ravel(), want)
    assert perturb.formulas((30,)).endswith("bit_flip: the chosen bits flipped (bits 30); halve: w(1-s/2)")
    from configs import esa as esa_configs
    from wa.esa import pipeline
    cfg = esa_configs.get_config("smoke")
    cfg.perturb = "halve,sign_flip"
    assert pipeline.check(cfg).kinds == ["halve", "sign_flip"]


def test_stats():
    ci = stats.mean_ci([1.0, 2.0, 3.0, 4.0])
    assert ci["mean"] == 2.5 and ci["ci95"][0] < 2.5 < ci["ci95"][1]
    assert stats.mean_ci([2.0])["ci95"] == [2.0, 2.0]
    t = stats.greater([40, 41, 42], list(range(30)))  # the exact one-sided p is 1 / C(33, 3)
    assert t["p_value"] == pytest.approx(1 / 5456)
    assert stats.greater([1, 2, 3], [10, 11, 12])["p_value"] > 0.9
    m = stats.monotone([0.1, 0.5, 1.0], [0.2, 0.9, 3.0])
    assert m["monotone_increasing"] and m["spearman_rho"] == pytest.approx(1.0)
