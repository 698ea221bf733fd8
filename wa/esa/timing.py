"""Where an analysis spends its time: each stage's seconds beside its floor.

A stage's floor is the forward passes its results need, counted in positions (window × token slots a forward pass
processes; a gradient counts 3 forward passes, ``wa.esa.scores.GRADIENT``), times the seconds one position took in
this run's own held-out evaluations (their median, so the compiling first call does not count). A stage far above
its floor spends its time on something other than the model's arithmetic.
"""

from __future__ import annotations

import time

import numpy as np


class Clock:
    def __init__(self, eval_positions: int = 0):
        self.last = time.time()
        self.eval_positions = eval_positions   # positions one held-out evaluation processes
        self.eval_seconds: list[float] = []     # each held-out evaluation's compiled calls
        self.rows: list[dict] = []
        self._mark = 0

    def evaluated(self, seconds: float) -> None:
        self.eval_seconds.append(float(seconds))

    def stage(self, name: str, positions: float = 0.0, note: str = "") -> None:
        """Ends stage ``name``: its seconds since the last stage ended, the held-out evaluations it ran and
        ``positions`` of other forward-pass work (calibration passes, in forward-pass positions)."""
        now = time.time()
        n = len(self.eval_seconds) - self._mark
        self.rows.append({"stage": name, "seconds": now - self.last, "evaluations": n,
                          "positions": float(positions) + n * self.eval_positions, "note": note})
        self.last, self._mark = now, len(self.eval_seconds)

    def per_position(self) -> float | None:
        """Seconds per forward-pass position: the median held-out evaluation over its positions."""
        if not self.eval_seconds or not self.eval_positions:
            return None
        return float(np.median(self.eval_seconds)) / self.eval_positions

    def table(self) -> dict:
        unit = self.per_position()
        rows = []
        for r in self.rows:
            floor = r["positions"] * unit if unit and r["positions"] else None   # no forward work: no floor
            rows.append({**r, "seconds": round(r["seconds"], 1),
                         "floor_seconds": None if floor is None else round(floor, 1),
                         "over_floor": round(r["seconds"] / floor, 2) if floor else None})
        return {"stages": rows, "seconds_per_evaluation": None if unit is None else unit * self.eval_positions,
                "evaluation_positions": self.eval_positions, "evaluations": len(self.eval_seconds)}
