"""An ESA run folder: the analysis's stages (``wa.esa.pipeline``), then its report (``wa.esa.report``)."""

from __future__ import annotations

import os

import jax

from wa import models, report, runs
from wa.data import paths
from wa.esa import pipeline
from wa.esa import report as esa_report


def fingerprint(cfg) -> dict:
    """What an analysis depends on: its config and the checkpoint's identity (path and weights' digests)."""
    return {"config": cfg.to_dict(), "checkpoint": models.identity(paths.checkpoint(cfg.model))}


def open_folder(cfg, workdir: str, job: str, overwrite: bool = False) -> runs.Run:
    """The run folder of a job on a model (``esa``, ``prune``, ``attack``, ``roles``, ``backdoor``): the inputs
    checked, a folder holding another run refused before any compute (``overwrite`` empties it first), config.json
    written by process 0."""
    pipeline.check_inputs(cfg)
    folder = runs.Run.open(workdir, job, fingerprint(cfg), overwrite, jax.process_index())
    folder.started()
    if jax.process_index() == 0:
        report.write_json(os.path.join(workdir, "config.json"), cfg.to_dict())
    return folder


def run(cfg, workdir: str, overwrite: bool = False) -> tuple[pipeline.Analysis, dict]:
    """Runs the analysis ``cfg`` describes; process 0 writes config.json and the report's files to ``workdir``,
    then ``DONE.json``. A folder holding another analysis is refused before any compute (its plots would otherwise
    sit beside the new ones); ``overwrite`` empties it first. Returns (analysis, summary)."""
    chief = jax.process_index() == 0
    folder = open_folder(cfg, workdir, "esa", overwrite)
    analysis = pipeline.run(cfg)
    summary = pipeline.summarize(analysis)
    if chief:
        files = esa_report.write(workdir, analysis, summary, cfg.save_plots)
        folder.finish(["config.json", *files])
    return analysis, summary
