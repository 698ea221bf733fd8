"""What every training loop in wa shares: orbax checkpoints with exact resume, a history file trimmed to the
restored point, and the simulated preemption (``halt_at``).

``wa.train.lm`` (LM training, counted in steps) and ``wa.train.loop`` (weight-space learners, counted in
epochs) both save their whole state after a unit of work and resume from the last save; the history written
beside the checkpoints is cut back to that point, so a killed run's later curve points never mix in.
"""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp
from absl import logging

from wa import report


def read_history(path: str, start: int, key: str, empty):
    """The history up to ``start`` (entries whose ``key`` is at most ``start``): a list of entries, or a dict of
    such lists. The state itself lives in the checkpoint, so a missing or damaged history (killed mid-write by an
    older wa, deleted by hand) costs only the curves before ``start``: resume goes on and says so."""
    try:
        with open(path) as f:
            h = json.load(f)
        if isinstance(empty, dict):
            return {k: [e for e in h.get(k, []) if e[key] <= start] for k in empty}
        return [e for e in h if e[key] <= start]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        logging.warning("%s: unreadable (%s); resuming after %s %d without the curves before it", path, e, key, start)
        return empty


class Checkpoints:
    """``workdir/checkpoints`` (orbax) and ``workdir/history.json``; without a workdir, nothing is kept."""

    def __init__(self, workdir: str | None, key: str, max_to_keep: int = 1):
        self.key = key
        self.mngr = self.hist_file = None
        if workdir:
            self.mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                                              options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                                                   create=True))
            self.hist_file = os.path.join(workdir, "history.json")

    def resume(self, state, empty_history):
        """(state, start, history): the last saved state and how far it got, or the given fresh state at 0."""
        if self.mngr is None or self.mngr.latest_step() is None:
            return state, 0, empty_history
        start = int(self.mngr.latest_step())
        state = self.mngr.restore(start, args=ocp.args.StandardRestore(state))
        logging.info("resumed after %s %d", self.key, start)
        return state, start, read_history(self.hist_file, start, self.key, empty_history)

    def save(self, n: int, state, history) -> None:
        """The state after ``n`` units, then the history (process 0): a kill between them loses only curves."""
        if self.mngr is None:
            return
        self.mngr.save(n, args=ocp.args.StandardSave(state))
        self.mngr.wait_until_finished()
        if jax.process_index() == 0:
            report.write_json(self.hist_file, history)


def halt(n: int, halt_at: int, flag: str) -> bool:
    """True once ``n`` units are done and ``halt_at`` (a simulated preemption; 0: never) asks to stop there."""
    if halt_at and n >= halt_at:
        logging.info("halting after %d as asked (%s=%d); re-run to resume", n, flag, halt_at)
        return True
    return False
