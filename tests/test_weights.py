"""Weight views: networks as jraph graphs."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from wa.weights import graph
from wa.zoo import archs


def _params(arch):
    return jax.tree.map(np.asarray, arch.module(10).init(jax.random.key(0), np.zeros((1, 8, 8, 1)))["params"])


def test_mlp_graph_nodes_edges_and_weights():
    p = _params(archs.Arch("mlp", 2, 5, "tanh"))
    p["hidden_1"]["bias"] = np.arange(5, dtype=np.float32)
    g = graph.to_graph(p, "mlp", "tanh")
    assert g.n_node.tolist() == [64 + 5 + 5 + 10] and g.n_edge.tolist() == [64 * 5 + 5 * 5 + 5 * 10]
    # Edge from hidden_0 unit 2 to hidden_1 unit 3 carries hidden_1/kernel[2, 3].
    e = np.flatnonzero((g.senders == 64 + 2) & (g.receivers == 64 + 5 + 3))
    assert len(e) == 1 and g.edges["w"][e[0], 0] == p["hidden_1"]["kernel"][2, 3] and not g.edges["w"][e[0], 1:].any()
    np.testing.assert_array_equal(g.nodes["x"][69:74, 0], np.arange(5))
    lt = g.nodes["layer_type"]
    assert (lt[:64] == 0).all() and (lt[64:74] == 1).all() and (lt[74:] == 3).all()
    assert (g.nodes["activation"][64:74] == graph.ACTIVATIONS.index("tanh")).all()
    assert (g.nodes["activation"][74:] == 0).all() and (g.nodes["x"][:64, 2] == 1).all()


def test_cnn_graph_carries_kernels_as_edge_vectors():
    p = _params(archs.Arch("cnn", 3, 4, "relu"))
    g = graph.to_graph(p, "cnn", "relu")
    assert g.n_node.tolist() == [1 + 4 * 3 + 10] and g.n_edge.tolist() == [1 * 4 + 4 * 4 * 2 + 4 * 10]
    e = np.flatnonzero((g.senders == 1 + 4 + 1) & (g.receivers == 1 + 8 + 2))[0]  # conv_2: channel 1 -> 2
    np.testing.assert_array_equal(g.edges["w"][e], p["conv_2"]["kernel"][:, :, 1, 2].reshape(9))
    assert g.edges["edge_type"][e] == graph.EDGE_TYPES.index("conv")


def test_batch_pads_to_fixed_budget():
    gs = [graph.to_graph(_params(archs.Arch("mlp", 1, w, "relu")), "mlp", "relu") for w in (3, 6)]
    b = graph.batch(gs, n_node=300, n_edge=1000, n_graph=4)
    assert b.n_node.sum() == 300 and b.n_edge.sum() == 1000 and len(b.n_node) == 4
    assert b.nodes["x"].shape == (300, 4) and b.edges["w"].shape == (1000, 9)
    with pytest.raises(graph.GraphError, match="below what the batch needs"):
        graph.batch(gs, n_node=100, n_edge=1000, n_graph=4)
    with pytest.raises(graph.GraphError, match="no graph view for family .resnet."):
        graph.to_graph({}, "resnet", "relu")


@pytest.mark.parametrize("arch", [archs.Arch("mlp", 3, 6, "gelu"), archs.Arch("cnn", 3, 5, "tanh")])
def test_permutations_keep_the_function_and_canonical_order_undoes_them(arch):
    from wa.weights import canonical
    p = _params(arch)
    perms = canonical.random_perms(p, arch.family, np.random.default_rng(0))
    q = canonical.permute(p, arch.family, perms)
    x = np.random.default_rng(1).uniform(size=(4, 8, 8, 1)).astype(np.float32)
    m = arch.module(10)
    np.testing.assert_allclose(m.apply({"params": q}, x), m.apply({"params": p}, x), rtol=1e-5, atol=1e-6)
    assert not np.array_equal(q[graph.layers(p, arch.family)[0][0]]["kernel"],
                              p[graph.layers(p, arch.family)[0][0]]["kernel"])
    cp, cq = canonical.canonicalize(p, arch.family), canonical.canonicalize(q, arch.family)
    back = canonical.align(q, p, arch.family)
    for a, b in zip(jax.tree.leaves(cp), jax.tree.leaves(cq), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, c in zip(jax.tree.leaves(p), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(a, c)


def test_statistics_features():
    from wa.weights import canonical, stats
    arch = archs.Arch("mlp", 2, 6, "relu")
    p = _params(arch)
    v, names = stats.features(p, "mlp")
    assert len(v) == len(names) == 3 * 2 * 7
    k = p["hidden_1"]["kernel"]
    i = names.index("layer1/kernel/var")
    assert v[i] == pytest.approx(k.var(), rel=1e-5) and v[names.index("layer1/kernel/q100")] == pytest.approx(k.max())
    q = canonical.permute(p, "mlp", canonical.random_perms(p, "mlp", np.random.default_rng(0)))
    np.testing.assert_allclose(stats.features(q, "mlp")[0], v, rtol=1e-6)
    v4, names4 = stats.features(p, "mlp", n_layers=4)
    assert names4[-14:] == names[-14:] and not v4[28:42].any()
    np.testing.assert_array_equal(v4[-14:], v[-14:])


def test_transformer_graph_has_attention_mlp_norm_and_residual_edges():
    p = _params(archs.Arch("transformer", 1, 16, "gelu"))
    g = graph.to_graph(p, "transformer", "gelu")
    blk = 16 + 48 + 16 + 16 + 32 + 16
    assert g.n_node.tolist() == [16 + 4 + 16 + blk + 16 + 10]
    assert g.n_edge.tolist() == [256 + 64 + (16 + 3 * 256 + 256 + 16 + 16 + 512 + 512 + 16) + 16 + 160]
    lt = [graph.LAYER_TYPES[t] for t in g.nodes["layer_type"]]
    first = {t: lt.index(t) for t in ("position", "embed", "mlp_in", "mlp_out", "attn_out")}
    e = np.flatnonzero((g.senders == first["position"] + 2) & (g.receivers == first["embed"] + 7))
    assert g.edges["w"][e[0], 0] == p["pos"][0, 2, 7]
    e = np.flatnonzero((g.senders == first["mlp_in"] + 3) & (g.receivers == first["mlp_out"] + 5))
    assert g.edges["w"][e[0], 0] == p["block_0"]["mlp_out"]["kernel"][3, 5]
    res = g.edges["edge_type"] == graph.EDGE_TYPES.index("residual")
    assert res.sum() == 32 and (g.edges["w"][res, 0] == 1).all()
    assert (g.senders[res][16:] == first["attn_out"] + np.arange(16)).all()
    assert (g.nodes["activation"][np.array(lt) == "mlp_in"] == graph.ACTIVATIONS.index("gelu")).all()


def test_tokens_are_the_graph_densely_and_permute_with_hidden_units():
    from wa.weights import canonical, tokens
    arch = archs.Arch("mlp", 2, 4, "relu")
    p = _params(arch)
    t = tokens.to_tokens(graph.to_graph(p, "mlp", "relu"), max_tokens=90)
    assert t["mask"].sum() == 64 + 4 + 4 + 10 and t["incoming"].shape == (90, 64 * 9)
    # Token of hidden_1 unit 2 (index 64 + 4 + 2): incoming weights = hidden_1/kernel[:, 2], in sender order.
    np.testing.assert_array_equal(t["incoming"][70].reshape(64, 9)[:4, 0], p["hidden_1"]["kernel"][:, 2])
    np.testing.assert_array_equal(t["edges"][70, 64:68, 0], p["hidden_1"]["kernel"][:, 2])
    assert t["adjacency"].sum() == 64 * 4 + 16 + 40 and t["x"][70, 0] == p["hidden_1"]["bias"][2]
    perms = canonical.random_perms(p, "mlp", np.random.default_rng(3))
    q = tokens.to_tokens(graph.to_graph(canonical.permute(p, "mlp", perms), "mlp", "relu"), max_tokens=90)
    order = np.concatenate([np.arange(64), 64 + perms[0], 68 + perms[1], np.arange(72, 90)])
    np.testing.assert_array_equal(q["edges"], t["edges"][order][:, order])
    np.testing.assert_array_equal(q["x"], t["x"][order])
    with pytest.raises(tokens.TokenError, match="more than max_tokens=50"):
        tokens.to_tokens(graph.to_graph(p, "mlp", "relu"), max_tokens=50)


class _Gated(archs.Net):
    """A family wa does not know: ``depth`` dense layers named ``gate_i``, then a head."""

    @nn.compact
    def __call__(self, x, train: bool = False, rate=0.0):
        x = x.reshape(x.shape[0], -1)
        for i in range(self.depth):
            x = archs.ACTIVATIONS[self.activation](
                nn.Dense(self.width, kernel_init=self.kernel_init, name=f"gate_{i}")(x))
        return nn.Dense(self.n_classes, kernel_init=self.kernel_init, name="head")(x)


def test_a_zoo_family_is_one_record(monkeypatch):
    """Registering one ZooFamily is all the architecture, graph, statistics, permutation and NFN views need."""
    from wa.weights import canonical, stats
    monkeypatch.setitem(archs.FAMILIES, "gated", archs.ZooFamily(
        "gated", _Gated, layers=archs.chain_layers("gate", "dense"), permutable=("dense",), min_depth=2))
    arch = archs.Arch("gated", 2, 5, "tanh")
    arch.check((8, 8, 1))
    with pytest.raises(archs.ArchError, match="depth must be >= 2"):
        archs.Arch("gated", 1, 5, "tanh").check()
    assert arch.layout_id == "gated-d2-w5" and arch.describe()["family"] == "gated"
    p = _params(arch)
    g = graph.to_graph(p, "gated", "tanh")
    assert g.n_node.tolist() == [64 + 5 + 5 + 10] and g.n_edge.tolist() == [64 * 5 + 5 * 5 + 5 * 10]
    assert [n for n, *_ in stats.tensors(p, "gated")] == ["gate_0", "gate_1", "head"]
    assert stats.features(p, "gated")[0].shape == (3 * 2 * len(stats.STATS),)
    assert canonical.pairs(p, "gated") == [(("gate_0",), ("gate_1",)), (("gate_1",), ("head",))]
    q = canonical.permute(p, "gated", canonical.random_perms(p, "gated", np.random.default_rng(0)))
    x = np.random.default_rng(1).uniform(size=(4, 8, 8, 1)).astype(np.float32)
    m = arch.module(10)
    np.testing.assert_allclose(m.apply({"params": q}, x), m.apply({"params": p}, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(canonical.canonicalize(q, "gated")["gate_0"]["kernel"],
                               canonical.canonicalize(p, "gated")["gate_0"]["kernel"], rtol=1e-6)
    assert "gated" in archs.chain_families()
    with pytest.raises(archs.ArchError, match="family 'gated' has no knob 'patch'"):
        archs.Arch("gated", 2, 5, "tanh", (("patch", 4),))
