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
