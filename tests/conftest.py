import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

# The persistent compilation cache the launch scripts use (launch.common --jax_cache): a test that builds the same
# learner or model twice (a resumed run, the bucketed and packed paths) compiles it once per machine.
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(os.path.join("~", ".cache", "wa", "jax")))
