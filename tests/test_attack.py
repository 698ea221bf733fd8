import itertools
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from wa.esa import attack


def test_codes_and_flips_are_exact():
    w = jnp.asarray([[0.5, -1.0], [0.25, 2.0], [-0.125, 0.0]], jnp.float32)
    q = attack.store({"w": w}, ["w"], "int8", lambda p: 0)      # one scale per column (output unit)
    np.testing.assert_array_equal(np.asarray(jax.lax.bitcast_convert_type(q.codes["w"], jnp.int8)),
                                  [[127, -64], [64, 127], [-32, 0]])
    np.testing.assert_allclose(np.asarray(q.scales["w"]), [[0.5 / 127, 2.0 / 127]], rtol=1e-7)
    # Two's complement: the sign bit of 127 gives -1, of -64 gives +64, of 0 gives -128.
    assert q.flipped("w", 0, 7)[1:] == pytest.approx((0.5, -0.5 / 127))
    assert q.flipped("w", 1, 7)[2] == pytest.approx(64 * 2.0 / 127)
    assert q.flipped("w", 5, 7)[2] == pytest.approx(-128 * 2.0 / 127)
    f = attack.store({"w": w}, ["w"], "float32", lambda p: 0)
    assert f.flipped("w", 0, 30)[2] == 2.0 ** 127 and f.flipped("w", 0, 31)[2] == -0.5
    b = attack.store({"w": w + 1e-3}, ["w"], "bfloat16", lambda p: 0)
    assert float(b.flat["w"][0, 0]) == float(ml_dtypes.bfloat16(0.501)) != 0.501     # the stored model is rounded
    assert b.flipped("w", 0, 14)[2] == float(ml_dtypes.bfloat16(0.501)) * 2.0 ** 128
    b.apply("w", 0, 15)
    assert float(b.flat["w"][0, 0]) == -float(ml_dtypes.bfloat16(0.501))
    assert attack.ENCODINGS["int8"].field(7) == "sign (-128)" and attack.ENCODINGS["float32"].field(30) == \
        "exponent MSB"


def _decode_np(codes, scale, encoding):
    if encoding == "int8":
        return codes.view(np.int8).astype(np.float64) * scale
    if encoding == "bfloat16":
        return codes.view(ml_dtypes.bfloat16).astype(np.float64)
    return codes.view(np.float32).astype(np.float64)


@pytest.mark.parametrize("encoding", list(attack.ENCODINGS))
def test_best_flips_are_the_brute_force_best(encoding):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, 7)).astype(np.float32) * 0.1
    g = rng.normal(size=(5, 7)).astype(np.float32)
    s = attack.store({"w": jnp.asarray(w)}, ["w"], encoding, lambda p: 0)
    codes = np.asarray(s.codes["w"])
    scale = None if s.scales["w"] is None else np.asarray(s.scales["w"])
    e = attack.ENCODINGS[encoding]
    cur = _decode_np(codes, scale, encoding)
    gains = {}
    with np.errstate(over="ignore", invalid="ignore"):
        for i, b in itertools.product(range(w.size), range(e.bits)):
            c = codes.copy().reshape(-1)
            c[i] ^= np.array(1 << b, c.dtype)
            new = _decode_np(c.reshape(codes.shape), scale, encoding).reshape(-1)[i]
            d = new - cur.reshape(-1)[i]
            gains[i, b] = np.float32(g.reshape(-1)[i]) * np.float32(d) if np.isfinite(new) else math.inf
    best = {}
    for (i, b), v in gains.items():       # each weight's best bit (the lowest bit on a tie, as the scan keeps)
        if i not in best or v > best[i][0]:
            best[i] = (v, b)
    want = sorted(best.items(), key=lambda t: -t[1][0])[:6]
    vals, idx, bits = (np.asarray(x) for x in attack.best_flips(jnp.asarray(g), s.codes["w"], s.scales["w"],
                                                                encoding, 6))
    assert [(int(i), int(b)) for i, b in zip(idx, bits, strict=True)] == [(i, b) for i, (_, b) in want]
    np.testing.assert_allclose(vals, [v for _, (v, _) in want], rtol=1e-5)


def _planted():
    """A softmax classifier whose every label is class 0, stored in int8, with one catastrophic bit: input
    feature 0 is 5 on every example and W[0, 0] = 0.4 (code 51 of column 0's scale 1/127, set by W[1, 0] = 1
    on a feature that is always 0); its sign bit turns it into code -77, logit 0 from +2 to about -3. Every other
    flip moves a logit by little, or raises class 0's."""
    rng = np.random.default_rng(1)
    w = (rng.normal(size=(16, 4)) * 0.01).astype(np.float32)
    w[0] = 0.0
    w[0, 0], w[1, 0] = 0.4, 1.0

    def data(seed):
        x = np.random.default_rng(seed).normal(size=(64, 16)).astype(np.float32) * 0.1
        x[:, 0], x[:, 1] = 5.0, 0.0
        return jnp.asarray(x)
    x_attack, x_held = data(2), data(3)

    def loss(flat, x):
        return -jnp.mean(jax.nn.log_softmax(x @ flat["w"])[:, 0])
    model = attack.Model(grad=jax.jit(jax.grad(lambda f: loss(f, x_attack))),
                         attack_loss=lambda f: float(loss(f, x_attack)),
                         perplexity=lambda f: float(jnp.exp(loss(f, x_held))))
    return model, attack.store({"w": jnp.asarray(w)}, ["w"], "int8", lambda p: 0)


def test_the_search_finds_a_planted_critical_bit():
    model, stored = _planted()
    base = model.perplexity(stored.flat)
    # Every single flip, evaluated: exactly one takes the held-out perplexity past 10x.
    passing = []
    for i, b in itertools.product(range(64), range(8)):
        codes, _, _ = stored.flipped("w", i, b)
        if model.perplexity(stored.with_codes("w", codes)) >= 10 * base:
            passing.append((i, b))
    assert passing == [(0, 7)]
    out = attack.search(model, stored.copy(), threshold=10, max_flips=5, candidates=4, exact=4)
    assert out["n_flips"] == 1 and out["passed"] and out["ppl_base"] == pytest.approx(base)
    f = out["flips"][0]
    assert (f["path"], f["index"], f["bit"], f["field"]) == ("w", 0, 7, "sign (-128)")
    assert f["before"] == pytest.approx(51 / 127) and f["after"] == pytest.approx(-77 / 127)
    assert f["ppl"] >= 10 * base
    # Without the search: the planted weight first needs one flip; a random order of the other 63 never passes.
    assert attack.ordered_flips(model, stored, [("w", 0), ("w", 5)], 10)["n_flips"] == 1
    others = [p for p in attack.random_order({"w": 64}, 64, seed=0) if p != ("w", 0)]
    assert attack.ordered_flips(model, stored, others, 10)["n_flips"] is None


def test_ordered_flips_bisect_to_the_least_count():
    # A perplexity that passes 10x once at least 37 weights of the list are flipped.
    stored = attack.store({"w": jnp.ones((10, 10))}, ["w"], "int8", lambda p: 0)
    flipped = lambda f: int(np.sum(np.asarray(f["w"]) < 0))          # noqa: E731
    model = attack.Model(None, None, lambda f: 1.0 + (100.0 if flipped(f) >= 37 else 0.0))
    order = attack.random_order({"w": 100}, 100, seed=3)
    out = attack.ordered_flips(model, stored, order, 10)
    assert out["n_flips"] == 37 and sorted(out["ppl"]) == [1, 2, 4, 8, 16, 32, 36, 37, 38, 40, 48, 64]


def test_orders_and_percentiles():
    scores = {"a": np.array([[0.1, 0.9], [0.5, 0.2]]), "b": np.array([0.8, 0.05, 0.3])}
    assert attack.score_order(scores, ["a", "b"], 3) == [("a", 1), ("b", 0), ("a", 2)]
    assert attack.percentile(scores, ["a", "b"], "a", 1) == 1.0
    assert attack.percentile(scores, ["a", "b"], "b", 1) == 0.0
    r = attack.random_order({"a": 4, "b": 3}, 7, seed=0)
    assert sorted(r) == [("a", 0), ("a", 1), ("a", 2), ("a", 3), ("b", 0), ("b", 1), ("b", 2)]


def test_bad_settings_are_one_line():
    with pytest.raises(attack.AttackError, match=r"unknown \['int4'\]; expected some of float32, bfloat16, int8"):
        attack.check(["int4"], 10, 10, 4, 8)
    with pytest.raises(attack.AttackError, match="must be > 1"):
        attack.check(["int8"], 1.0, 10, 4, 8)
    with pytest.raises(attack.AttackError, match="attack_exact=0: expected a positive integer"):
        attack.check(["int8"], 10, 10, 4, 0)


def test_the_attack_study_on_stories260k_writes_its_report(tmp_path, smoke_scored):
    # The launcher's path in process: setup, scores, the search and its controls, the report.
    import dataclasses

    from wa.esa import attack_report
    cfg, s, sc, sel = smoke_scored
    cfg = cfg.copy_and_resolve_references()
    cfg.attack_encodings, cfg.attack_max_flips, cfg.attack_control_max = "float32,int8", 2, 8
    res = attack_report.study(dataclasses.replace(s, cfg=cfg), sc, sel, progress=False)
    f32, i8 = res["encodings"]["float32"], res["encodings"]["int8"]
    # float32: one flip of the exponent's top bit destroys the model, found by the search and by either score's
    # order; a random weight's may not (an output row's weight that only lowers a token absent from the text).
    assert f32["search"]["n_flips"] == 1 and f32["search"]["flips"][0]["bit"] == 30
    assert f32["search"]["flips"][0]["ppl"] == float("inf")
    assert f32["controls"]["magnitude"]["n_flips"] == f32["controls"]["grad_x_weight"]["n_flips"] == 1
    # int8: each flip the search makes raises the attacker's loss; the budget of 2 does not reach 10x here.
    fl = i8["search"]["flips"]
    assert [f["field"] for f in fl] == ["sign (-128)"] * 2 and fl[0]["attack_loss"] < fl[1]["attack_loss"]
    assert i8["search"]["n_flips"] is None and not i8["search"]["passed"]
    assert i8["search"]["ppl_base"] != f32["search"]["ppl_base"]          # the quantized model's own reference
    assert set(i8["controls"]) == {"magnitude", "grad_x_weight", "random/0"}
    assert res["attacked_matrices"] == 36 and set(fl[0]["percentile"]) == {"magnitude", "grad_x_weight"}
    files = attack_report.write(str(tmp_path), cfg, res, s.base, 1.0)
    assert all((tmp_path / f).exists() for f in files)
    md = (tmp_path / "attack.md").read_text()
    assert "| int8 | " in md and "> 2 |" in md and "sign (-128)" in md
