"""The errors a user can cause, as opposed to bugs in wa.

Every error wa raises for bad input derives from ``WaError``: a config value out of range, a checkpoint that
is damaged or hostile, data that cannot be read, a run folder that holds another run. The ``launch/`` entry
points print these as one line (``error: ...``, exit code 2) and show a traceback only with ``--verbose``;
anything else is a bug and keeps its traceback. They stay ``ValueError``s so callers that caught those before
keep working.
"""

from __future__ import annotations


class WaError(ValueError):
    """Bad input: the message says what was wrong, where, and what was expected."""


class ConfigError(WaError):
    """A config value or flag out of range, or inconsistent with another."""


class CheckpointError(WaError):
    """A checkpoint that cannot be read safely: missing, damaged, malformed or pointing outside itself."""


class DataError(WaError):
    """A dataset, corpus or zoo that is missing, unreadable or not what the job needs."""


class RunError(WaError):
    """A run folder that holds another run, is locked by another writer, or cannot be written."""


def check_values(cfg, rules: dict, prefix: str = "--config.") -> None:
    """Range checks before any work: ``rules`` maps a dotted field to (test, what is expected).

    The first value that fails its test is one ``ConfigError`` naming the flag, the value and the expectation.
    """
    for field, (ok, expected) in rules.items():
        value = cfg
        for part in field.split("."):
            value = value[part]
        try:
            good = bool(ok(value))
        except (TypeError, ValueError):
            good = False
        if not good:
            raise ConfigError(f"{prefix}{field}={value!r}: expected {expected}")


POSITIVE = (lambda v: v > 0, "a positive number")
NON_NEGATIVE = (lambda v: v >= 0, "a number >= 0")
COUNT = (lambda v: int(v) == v and v >= 1, "an integer >= 1")
FRACTION = (lambda v: 0 <= v < 1, "a fraction in [0, 1)")
