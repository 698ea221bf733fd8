"""Run folders that resume only the run they hold, have one writer, and say when they are complete.

``Run.open(workdir, job, fingerprint)``:
  * checks the folder can be created and written (before any work);
  * takes an exclusive lock on ``.lock-<process>`` (``fcntl``), so a second process writing the same folder
    stops at once; the processes of one multi-host job hold different locks (one per process index);
  * compares ``fingerprint`` (the resolved config and the identity of the inputs: zoo path and plan hash,
    checkpoint path and weights hash, corpus hash) with the one ``run.json`` recorded when the folder was
    first used. Resume goes on only when they are equal; otherwise it stops before touching anything and
    names the fields that differ. ``overwrite=True`` empties the folder and starts afresh.
``Run.finish(files)`` writes ``DONE.json`` last, listing the files it vouches for with their sizes;
``complete(workdir, job)`` is how a caller tells a finished run from a folder left by a killed one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil

from flax import traverse_util

from wa import errors, report

RUN_FILE = "run.json"
DONE_FILE = "DONE.json"
_HELD: dict[str, int] = {}   # lock path -> fd: kept open (locked) for the life of the process


def _jsonable(x):
    return json.loads(json.dumps(x, default=report._default))


def differences(old: dict, new: dict, limit: int = 6) -> list[str]:
    a, b = (traverse_util.flatten_dict(_jsonable(d), sep=".") for d in (old, new))
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
    out = [f"{k}: {a.get(k, '<absent>')!r} in the folder, {b.get(k, '<absent>')!r} now" for k in keys[:limit]]
    if len(keys) > limit:
        out.append(f"... and {len(keys) - limit} more")
    return out


def file_digest(path: str, whole_below: int = 1 << 30) -> str:
    """sha256 of a file; above ``whole_below`` bytes, of its size, first and last 16 MiB (hashing an 8B
    checkpoint whole would cost minutes on every start)."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size <= whole_below:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return "sha256:" + h.hexdigest()
        h.update(str(size).encode())
        h.update(f.read(16 << 20))
        f.seek(size - (16 << 20))
        h.update(f.read(16 << 20))
    return "sha256-ends:" + h.hexdigest()


def files_digest(paths) -> dict:
    return {os.path.basename(p): file_digest(p) for p in sorted(paths)}


class Run:
    def __init__(self, workdir: str, job: str, process: int):
        self.workdir, self.job, self.process = workdir, job, process

    @classmethod
    def open(cls, workdir: str | None, job: str, fingerprint: dict, overwrite: bool = False,
             process: int = 0) -> Run:
        workdir = writable(workdir, job)
        run = cls(workdir, job, process)
        run._lock()
        try:
            run._check_and_record(fingerprint, overwrite)
        except BaseException:
            run.release()
            raise
        return run

    def _check_and_record(self, fingerprint: dict, overwrite: bool) -> None:
        workdir, job, process = self.workdir, self.job, self.process
        path = os.path.join(workdir, RUN_FILE)
        record = {"job": job, "fingerprint": _jsonable(fingerprint)}
        if os.path.exists(path):
            try:
                with open(path) as f:
                    old = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise errors.RunError(f"{path}: unreadable ({e}); start afresh with --overwrite or use another "
                                      "--workdir") from e
            diff = differences({"job": old.get("job"), **old.get("fingerprint", {})},
                               {"job": job, **record["fingerprint"]})
            if diff and not overwrite:
                raise errors.RunError(
                    f"--workdir={workdir} holds another run, so it cannot be resumed: " + "; ".join(diff)
                    + ". Use another --workdir, or --overwrite to delete that run and start afresh")
        elif _entries(workdir) and not overwrite:
            raise errors.RunError(
                f"--workdir={workdir} already holds files ({', '.join(sorted(_entries(workdir))[:5])}) but no "
                f"{RUN_FILE}, so wa cannot tell which run wrote them. Use another --workdir, or --overwrite to "
                "delete them and start afresh")
        if overwrite and process == 0:
            for name in _entries(workdir):
                p = os.path.join(workdir, name)
                shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
        if process == 0:
            report.write_json(path, record)

    @property
    def _lock_path(self) -> str:
        return os.path.join(self.workdir, f".lock-{self.process}")

    def _lock(self):
        path = self._lock_path
        if path in _HELD:
            return
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise errors.RunError(f"--workdir={self.workdir} is being written by {holder} (lock {path}); wait for "
                                  "it to finish or use another --workdir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"wa {self.job} pid {os.getpid()}".encode(), 0)
        _HELD[path] = fd

    def started(self) -> None:
        """Resuming: the completion marker no longer vouches for files that are about to be rewritten."""
        done = os.path.join(self.workdir, DONE_FILE)
        if self.process == 0 and os.path.exists(done):
            os.remove(done)

    def finish(self, files: list[str]) -> None:
        """Writes the completion marker last: the files it names, relative to the folder, with their sizes; then
        lets the folder go (a library caller may open it again, or another process may, in the same session)."""
        if self.process:
            self.release()
            return
        listed = {}
        for f in files:
            p = os.path.join(self.workdir, f)
            if not os.path.isfile(p):
                raise errors.RunError(f"{p}: missing when the run finished; the run is not complete")
            listed[f] = os.path.getsize(p)
        report.write_json(os.path.join(self.workdir, DONE_FILE), {"job": self.job, "files": listed})
        self.release()

    def release(self) -> None:
        fd = _HELD.pop(self._lock_path, None)
        if fd is not None:
            os.close(fd)


def complete(workdir: str, job: str | None = None) -> bool:
    """True when ``workdir`` holds a finished run (of ``job``): its marker and every file it lists, same sizes."""
    try:
        with open(os.path.join(workdir, DONE_FILE)) as f:
            done = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    if job is not None and done.get("job") != job:
        return False
    return all(os.path.isfile(os.path.join(workdir, f)) and os.path.getsize(os.path.join(workdir, f)) == n
               for f, n in done.get("files", {}).items())


def _entries(workdir: str) -> list[str]:
    return [n for n in os.listdir(workdir) if not n.startswith(".lock-")]


def writable(path: str | None, job: str) -> str:
    """``report.workdir`` that fails at once, with the flag named, when the folder cannot be written."""
    if path and os.path.exists(path) and not os.path.isdir(path):
        raise errors.RunError(f"--workdir={path} is a file; expected a folder (it is created if missing)")
    try:
        workdir = report.workdir(path, job)
        probe = os.path.join(workdir, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise errors.RunError(f"--workdir={path}: cannot create or write the folder ({e.strerror})") from None
    return workdir


def output_file(path: str, flag: str) -> str:
    """Checks, before any work, that ``path`` (a ``--flag`` naming an output file) can be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise errors.RunError(f"--{flag}={path} is a directory; expected a file name")
    if not os.path.isdir(folder):
        raise errors.RunError(f"--{flag}={path}: its folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise errors.RunError(f"--{flag}={path}: not writable")
    return path
