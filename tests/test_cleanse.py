import jax
import numpy as np
import pytest

from wa.data import images
from wa.esa import backdoor
from wa.zoo import archs, cleanse
from wa.zoo import population as pop_lib


@pytest.fixture(scope="module")
def planted():
    """Four small MLPs trained together on 8x8 digits: models 0 and 2 with a BadNets backdoor (a fifth of their
    training images stamped with a 3x3 checkerboard and relabelled to class 3 or 7), models 1 and 3 clean."""
    d = images.load("digits")
    n = 4
    trig = pop_lib.Trigger(patch=3, margin=0)
    pop = pop_lib.Population(archs.Arch("mlp", 1, 32, "relu"), 10, d.shape, len(d.y_train), batch_size=32,
                             max_shift=0, trigger=trig)
    rng = np.random.default_rng(0)
    labels = np.tile(d.y_train.astype(np.int32), (n, 1))
    poison = np.zeros((n, len(d.y_train)), bool)
    targets = {0: 3, 2: 7}
    for i, t in targets.items():
        pick = rng.choice(np.flatnonzero(d.y_train != t), len(d.y_train) // 5, replace=False)
        poison[i, pick], labels[i, pick] = True, t
    hp = pop_lib.hparams_arrays([dict(optimizer="adam", lr=3e-3, weight_decay=0.0, dropout=0.0, augment=0)] * n)
    keys = np.asarray(jax.vmap(jax.random.PRNGKey)(np.arange(n)))
    params = pop.init(keys, ["he_normal"] * n, np.ones(n))
    opt = pop.opt_init(params)
    mask = np.ones((n, len(d.y_train)), bool)
    for _ in range(15):
        params, opt, keys, _ = pop.epoch(params, opt, keys, hp, mask, labels, d.x_train, poison=poison)
    return pop, jax.tree.map(np.asarray, params), d, trig, targets


def test_the_planted_backdoor_is_learned_and_neural_cleanse_finds_it(planted):
    pop, params, d, trig, targets = planted
    other = {t: d.y_test != t for t in targets.values()}
    for i in range(4):
        p = jax.tree.map(lambda a, i=i: a[i], params)
        clean_acc = float((np.asarray(pop.apply(p, d.x_test)).argmax(-1) == d.y_test).mean())
        assert clean_acc > 0.85, (i, clean_acc)
        hit = np.asarray(pop.apply(p, trig.stamp(d.x_test))).argmax(-1)
        if i in targets:   # the trigger sends other classes' images to the target; without it, it does not
            t = targets[i]
            assert (hit[other[t]] == t).mean() > 0.95
            assert (np.asarray(pop.apply(p, d.x_test)).argmax(-1)[other[t]] == t).mean() < 0.05
    r = cleanse.reverse(pop.apply, params, d.x_test[:256], 10, cleanse.Spec())
    index, smallest = cleanse.anomaly(r["norm"])
    # Both backdoored models stand out and name their target; neither clean one is flagged.
    assert backdoor.auroc(index.tolist(), [1, 0, 1, 0]) == 1.0, index
    assert index[0] > 2 and index[2] > 2 and index[1] < 2 and index[3] < 2, index
    assert smallest[0] == 3 and smallest[2] == 7, smallest
    assert (r["success"] > 0.5).all(), r["success"]


def test_anomaly_index_by_hand():
    norm = np.array([[10.0, 11.0, 9.0, 12.0, 2.0], [5.0, 5.0, 5.0, 5.0, 5.0]])
    index, smallest = cleanse.anomaly(norm)
    # Row 0: median 10, |dev| = 0, 1, 1, 2, 8 -> MAD 1 -> index (10 - 2) / 1.4826.
    assert index[0] == pytest.approx(8 / 1.4826) and smallest[0] == 4 and index[1] == 0.0
    with pytest.raises(cleanse.CleanseError, match="steps and batch >= 1"):
        cleanse.Spec(steps=0).check()
