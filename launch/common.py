"""Flags and start-up shared by every entry point: multi-host, forced host devices, logging."""

from __future__ import annotations

import importlib.util
import os
import re
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from wa import errors, parallel

flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-host job.")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.DEFINE_string("cpu_collectives", "gloo", "Collectives for multi-process CPU runs.")
flags.DEFINE_integer("host_devices", None,
                     "Expose this many CPU devices (like --xla_force_host_platform_device_count); "
                     "for trying meshes on a machine without accelerators.")

flags.DEFINE_string("jax_cache", os.path.join("~", ".cache", "wa", "jax"),
                    "Persistent compilation cache folder ('' to disable): re-runs skip XLA compiles.")
flags.DEFINE_boolean("overwrite", False, "Delete what --workdir holds and start afresh, instead of resuming "
                     "(a resume goes on only when the folder holds this very run).")
flags.DEFINE_boolean("verbose", False, "Show the traceback of expected errors (bad input) too.")
FLAGS = flags.FLAGS


def fail(message: str, code: int = 2):
    """Ends the process with one line on stderr: what was wrong and what was expected."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    sys.exit(code)


def run(main) -> None:
    """``app.run(main)``, printing wa's expected errors as one line (exit 2) unless ``--verbose``."""
    def guarded(argv):
        try:
            return main(argv)
        except errors.WaError as e:
            if FLAGS.verbose:
                raise
            fail(e)

    def parse(argv):
        try:
            return FLAGS(argv)
        except flags.IllegalFlagValueError as e:
            # A config file's get_config refusing its argument (an unknown variant) raises ValueError, which
            # ml_collections wraps in a traceback: the config's own message is the one line.
            root = e
            while root.__context__ is not None:
                root = root.__context__
            if str(e).startswith("flag --config=") and root is not e and isinstance(root, ValueError):
                fail(root)
        except flags.Error:
            pass
        except (AttributeError, KeyError) as e:  # --config.x for a field the --config file lacks
            _unknown_field(e, None)
        return app.parse_flags_with_usage(argv)   # any other flag error: absl's message and usage, as before
    app.run(guarded, flags_parser=parse)


def config_flag(default: str, help_text: str):
    """``--config`` (an ml_collections config file) whose overrides are checked when the flag is defined.

    ml_collections applies ``--config.x=v`` while the flag is being defined (at import), so an unknown field
    surfaces there as a bare ``AttributeError``; it becomes one line naming the flag.
    """
    try:
        return config_flags.DEFINE_config_file("config", default, help_text)
    except (AttributeError, KeyError) as e:
        _unknown_field(e, default)


def _unknown_field(e: Exception, default: str | None):
    field = re.sub(r"[\"']", "", str(e))
    args = sys.argv[1:]
    given = [a for a in args if a.startswith("--config.") and field in a] or ["--config.*"]
    config = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
    if config is None and "--config" in args[:-1]:
        config = args[args.index("--config") + 1]
    fail(f"{given[0]}: the config {config or default} has no field {field!r}; overrides must name an existing "
         "field (look up the names in the config file)")


def start() -> None:
    """Call first in ``main``: before any JAX computation starts its backend."""
    if FLAGS.jax_cache and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(FLAGS.jax_cache))
    if FLAGS.host_devices:
        jax.config.update("jax_num_cpu_devices", FLAGS.host_devices)
    parallel.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                        FLAGS.cpu_collectives)
    logging.info("devices: %d global (%d local) on %s; process %d of %d", jax.device_count(),
                 jax.local_device_count(), jax.default_backend(), jax.process_index(),
                 jax.process_count())


def is_chief() -> bool:
    return jax.process_index() == 0


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, variant: str):
    """``configs/<name>.py:<variant>`` as a ConfigDict, for jobs that run another job's config."""
    spec = importlib.util.spec_from_file_location(f"configs_{name}", os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)
