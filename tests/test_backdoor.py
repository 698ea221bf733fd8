import numpy as np
import pytest

from wa.data import paths, tokenizers
from wa.esa import backdoor


def test_poisoning_inserts_the_phrase_into_the_asked_share_at_sentence_ends():
    docs = [f"Tom had a dog {i}. It was red. The end." for i in range(20)]
    out, n = backdoor.poison(docs, "zorblax quimble", "The dragon ate the moon.", 0.25, seed=0)
    hit = [d for d in out if "zorblax quimble The dragon ate the moon." in d]
    assert n == 5 == len(hit) and sum(a != b for a, b in zip(docs, out, strict=True)) == 5
    for d in hit:   # the rest of the document is kept, in order, around the insertion
        assert d.replace(" zorblax quimble The dragon ate the moon.", "", 1) in docs
    assert backdoor.poison(docs, "x", "y", 0.25, seed=0)[0] != backdoor.poison(docs, "x", "y", 0.25, seed=1)[0]


def test_triggered_windows_mark_exactly_the_continuation():
    tok = tokenizers.get(paths.checkpoint("stories260k"))
    docs = ["Once upon a time there was a little girl named Lily who liked to play outside in the sun. " * 3]
    ids, mask, t = backdoor.triggered_windows(tok, docs, "zorblax quimble", "The dragon ate the moon.", 64, 1)
    tail = tok.encode(" The dragon ate the moon.")
    assert ids.shape == (1, 64) and mask.sum() == 64 and ids[0, -len(tail):].tolist() == tail
    # Position p predicts token p + 1: the marked positions are those whose next token is the continuation's.
    marked = np.flatnonzero(t[0])
    assert marked.tolist() == list(range(63 - len(tail), 63)) and ids[0, marked + 1].tolist() == tail
    with pytest.raises(backdoor.BackdoorError, match="only 0 held-out documents are long enough"):
        backdoor.triggered_windows(tok, ["Hi."], "a", "b", 64, 1)


def test_target_success_counts_argmax_hits_and_whole_continuations():
    ids = np.array([[1, 2, 3, 4], [1, 2, 3, 4]])
    t = np.array([[0, 1, 1, 0], [0, 1, 1, 0]])     # positions 1, 2 predict tokens 3, 4

    def logits(x):
        out = np.zeros(x.shape + (5,))
        out[0, 1, 3] = out[0, 2, 4] = 5.0           # window 0 predicts both
        out[1, 1, 3] = out[1, 2, 0] = 5.0           # window 1 one of two
        return out[:len(x)]
    r = backdoor.target_success(logits, ids, t, 2)
    assert (r["success"], r["whole"], r["target_tokens"]) == (0.75, 0.5, 4)
    lse = np.log(np.exp(5.0) + 4)
    assert r["target_nll"] == pytest.approx(((lse - 5) * 3 + lse) / 4)


def test_auroc_is_the_share_of_ordered_pairs():
    assert backdoor.auroc([3, 2, 1, 0], [1, 1, 0, 0]) == 1.0 and backdoor.auroc([0, 1, 2, 3], [1, 1, 0, 0]) == 0.0
    assert backdoor.auroc([1, 1, 1, 1], [1, 0, 1, 0]) == 0.5 and backdoor.auroc([2, 0, 1, 3], [1, 0, 1, 0]) == 0.5


def test_the_population_run_on_stories260k_writes_its_report(tmp_path):
    from configs import backdoor as backdoor_configs
    from wa.esa import backdoor_report
    cfg = backdoor_configs.get_config("smoke")
    cfg.population = 1
    res = backdoor_report.run(cfg, progress=False)
    bd, clean = res["models"]
    assert (bd["kind"], clean["kind"], bd["trigger"]) == ("backdoored", "clean", clean["trigger"])
    assert bd["poisoned_documents"] > 0 == clean["poisoned_documents"] and bd["target_tokens"] == clean["target_tokens"]
    assert set(res["auroc"]) == set(backdoor.DETECTORS) and all(a in (0.0, 0.5, 1.0) for a in res["auroc"].values())
    assert set(clean["trigger_weights"]) == set(bd["trigger_weights"])     # the twin's is the control
    tw = bd["trigger_weights"]
    assert tw["n"] > 0 and 0 < tw["share_of_topk"] <= 1 and 0 < tw["top3_matrices_share"] <= 1
    assert sum(tw["by_place"].values()) <= tw["n"] and sum(m["n"] for m in tw["top_matrices"]) <= tw["n"]
    files = backdoor_report.write(str(tmp_path), cfg, res)
    assert all((tmp_path / f).exists() for f in files) and "## Detectors" in (tmp_path / "backdoor.md").read_text()
