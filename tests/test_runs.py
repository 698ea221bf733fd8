"""Run folders resume only their own run, have one writer, and mark completion last; bad values fail first."""

import fcntl
import json
import os
import re

import pytest

from configs import esa as esa_configs
from configs import probe as probe_configs
from configs import train_lm as lm_configs
from configs import zoo as zoo_configs
from wa import errors, report, runs
from wa.data import text
from wa.esa import pipeline
from wa.learners import probe
from wa.parallel import mesh
from wa.train import lm
from wa.zoo import plan as plan_lib

FP = {"config": {"lr": 0.001, "data": {"name": "digits"}}, "zoo": {"plan_hash": "abc"}}


def test_resume_needs_the_same_fingerprint(tmp_path):
    wd = str(tmp_path / "run")
    run = runs.Run.open(wd, "probe", FP)
    (tmp_path / "run" / "metrics.json").write_text("{}")
    run.release()
    runs.Run.open(wd, "probe", FP).release()   # same run: resumes
    other = {"config": {"lr": 0.01, "data": {"name": "digits"}}, "zoo": {"plan_hash": "def"}}
    before = (tmp_path / "run" / "run.json").read_bytes()
    with pytest.raises(errors.RunError, match=r"holds another run, so it cannot be resumed: config.lr: 0.001 in the "
                                              r"folder, 0.01 now; zoo.plan_hash: 'abc' in the folder, 'def' now\. "
                                              r"Use another --workdir, or --overwrite"):
        runs.Run.open(wd, "probe", other)
    assert (tmp_path / "run" / "run.json").read_bytes() == before and (tmp_path / "run" / "metrics.json").exists()
    with pytest.raises(errors.RunError, match=r"job: 'probe' in the folder, 'esa' now"):
        runs.Run.open(wd, "esa", FP)
    runs.Run.open(wd, "probe", other, overwrite=True).release()
    assert sorted(os.listdir(wd)) == [".lock-0", "run.json"]
    assert json.load(open(os.path.join(wd, "run.json")))["fingerprint"]["zoo"] == {"plan_hash": "def"}


def test_folder_with_files_but_no_record_is_not_adopted(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(errors.RunError, match=r"already holds files \(metrics.json\) but no run.json"):
        runs.Run.open(str(tmp_path), "probe", FP)


def test_second_writer_is_locked_out(tmp_path):
    wd = tmp_path / "run"
    wd.mkdir()
    # Another process's lock (flock locks belong to an open file, so a second open in this process is a stranger).
    fd = os.open(wd / ".lock-0", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"wa zoo pid 4242")
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(errors.RunError, match=r"is being written by wa zoo pid 4242"):
            runs.Run.open(str(wd), "zoo", FP)
        # A multi-host peer (another process index) takes its own lock.
        runs.Run.open(str(wd), "zoo", FP, process=1).release()
    finally:
        os.close(fd)
    assert not (wd / "run.json").exists()   # nothing written by the refused opener (peers never write it)


def test_completion_marker_vouches_for_its_files(tmp_path):
    run = runs.Run.open(str(tmp_path), "probe", FP)
    report.write_json(str(tmp_path / "metrics.json"), {"a": 1})
    assert not runs.complete(str(tmp_path), "probe")
    run.finish(["metrics.json"])
    assert runs.complete(str(tmp_path), "probe") and not runs.complete(str(tmp_path), "esa")
    (tmp_path / "metrics.json").write_text("{}")       # changed afterwards: no longer the file it vouched for
    assert not runs.complete(str(tmp_path), "probe")
    run.started()                                        # a resume withdraws the marker first
    assert not (tmp_path / "DONE.json").exists()
    with pytest.raises(errors.RunError, match="predictions.parquet: missing when the run finished"):
        run.finish(["predictions.parquet"])
    run.release()


def test_atomic_writes_leave_no_temporary_files(tmp_path):
    path = str(tmp_path / "x.json")
    report.write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        with report.atomic(path) as tmp, open(tmp, "w") as f:
            f.write("half")
            raise TypeError("killed mid-write")
    assert json.load(open(path)) == {"a": 1} and os.listdir(tmp_path) == ["x.json"]


def test_output_paths_are_checked_before_work(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(errors.RunError, match=r"--workdir=.*file is a file; expected a folder"):
        runs.writable(str(tmp_path / "file"), "esa")
    with pytest.raises(errors.RunError, match=r"--json=.* is a directory"):
        runs.output_file(str(tmp_path), "json")
    with pytest.raises(errors.RunError, match=r"its folder .*nowhere does not exist"):
        runs.output_file(str(tmp_path / "nowhere" / "x.json"), "json")


def _probe_cfg(**kv):
    c = probe_configs.get_config("nwpa,smoke")
    for k, v in kv.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


@pytest.mark.parametrize("field,value,expected", [
    ("train.lr", -1.0, "--config.train.lr=-1.0: expected a positive number"),
    ("train.batch_size", 0, "--config.train.batch_size=0: expected an integer >= 1"),
    ("train.warmup", 1.5, "--config.train.warmup=1.5: expected a fraction in [0, 1)"),
    ("split.fractions", (0.5, 0.6, -0.1), "expected three positive fractions"),
])
def test_probe_values_are_range_checked(tmp_path, field, value, expected):
    with pytest.raises(errors.ConfigError, match=re.escape(expected)):
        probe.check(_probe_cfg(**{field: value}))


@pytest.mark.parametrize("field,value,expected", [
    ("store.chunk_models", 0, "--config.store.chunk_models=0: expected an integer >= 1"),
    ("batch_size", 0, "--config.batch_size=0: expected an integer >= 1"),
    ("hparams.dropout_zero", 1.5, "--config.hparams.dropout_zero=1.5: expected a probability"),
])
def test_zoo_values_are_range_checked(field, value, expected):
    c = zoo_configs.get_config("smoke")
    node = c
    *parents, leaf = field.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(errors.ConfigError, match=expected):
        plan_lib.make_plan(c, 10)


def test_lm_values_and_corpus_are_checked(tmp_path):
    c = lm_configs.get_config("smoke")
    c.val_fraction = -0.5
    with pytest.raises(errors.ConfigError, match=r"--config.val_fraction=-0.5: expected a fraction in \(0, 1\)"):
        lm.check(c)
    c = lm_configs.get_config("smoke")
    c.warmup = c.steps   # optax's cosine decay would raise on a schedule with no step after the warmup
    with pytest.raises(errors.ConfigError, match=r"--config.warmup=6: the warmup must end before the run's last "
                                                 r"step \(--config.steps=6\)"):
        lm.check(c)
    c = lm_configs.get_config("smoke")
    c.tokenizer = "nosuch"
    with pytest.raises(errors.DataError, match=r"tokenizer 'nosuch': expected 'gpt2', 'bytes'"):
        lm.check_inputs(c)   # launch.train_lm calls it before it claims --workdir
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(errors.DataError, match=r"bin.txt is not UTF-8 text \(byte 0: invalid start byte\)"):
        text.read(str(tmp_path / "bin.txt"))
    with pytest.raises(errors.DataError, match=r"is a directory; expected a text file"):
        text.read(str(tmp_path))


def test_mesh_axes_and_topk_are_checked():
    with pytest.raises(errors.ConfigError, match=r"mesh 'foo:1': unknown axis 'foo'; wa's partition rules use data"):
        mesh.parse_axes("foo:1")
    cfg = esa_configs.get_config("smoke")
    cfg.topk, cfg.mode = 64, "per_layer"
    with pytest.raises(errors.ConfigError, match=r"--config.topk=64 selects every weight \(the largest matrix holds "
                                                 r"64\), so top-k, random-k and bottom-k would be the same set"):
        pipeline.check_topk(cfg, {"a": 64, "b": 32})
    cfg.topk = 63
    pipeline.check_topk(cfg, {"a": 64, "b": 32})
    cfg.topk, cfg.mode = 96, "global"
    with pytest.raises(errors.ConfigError, match=r"\(all the selected matrices together holds 96\)"):
        pipeline.check_topk(cfg, {"a": 64, "b": 32})
    cfg.topk = 0.9
    pipeline.check_topk(cfg, {"a": 64, "b": 32})   # a fraction in (0, 1) always leaves weights out


def test_a_finished_run_lets_its_folder_go(tmp_path):
    wd = str(tmp_path / "run")
    run = runs.Run.open(wd, "zoo", FP)
    run.finish([])
    # A stranger (a second open file) can now take the lock a finished run held.
    fd = os.open(os.path.join(wd, ".lock-0"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    assert runs.complete(wd, "zoo")
