import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import pytest  # noqa: E402

# The persistent compilation cache the launch scripts use (launch.common --jax_cache): a test that builds the same
# learner or model twice (a resumed run, the bucketed and packed paths) compiles it once per machine.
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(os.path.join("~", ".cache", "wa", "jax")))


@pytest.fixture(scope="session")
def smoke_zoo(tmp_path_factory):
    """The ``configs/zoo.py:smoke`` zoo, built once per test session by ``launch.make_zoo`` (its run folder).

    Under pytest-xdist every worker has its own session, so the first to arrive builds it in the shared base
    folder under a file lock and the others read it. Tests only read it (a refused resume leaves it untouched)."""
    import filelock

    from tests import helpers
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    wd = root / "smoke_zoo"
    with filelock.FileLock(str(root / "smoke_zoo.lock")):
        if not (wd / "DONE.json").exists():
            helpers.run_launch("launch.make_zoo", "--config", "configs/zoo.py:smoke", "--workdir", str(wd))
    return wd


@pytest.fixture(scope="session")
def smoke_scored():
    """stories260K set up and scored on the attack and roles runs' shared smoke settings (their configs differ only
    in their own fields): (cfg, setup, scores, selections), built once per test session."""
    from configs import attack, roles
    from wa.esa import pipeline
    cfg = attack.get_config("smoke")
    extra = roles.get_config("smoke")
    for k in extra:
        if k.startswith("roles_"):
            cfg[k] = extra[k]
    assert {k: v for k, v in extra.items() if not k.startswith("roles_")} == \
        {k: v for k, v in cfg.items() if not k.startswith(("attack_", "roles_"))}
    s = pipeline.setup(cfg, progress=False)
    sc, sel = pipeline.score(s, progress=False)
    return cfg, s, sc, sel
