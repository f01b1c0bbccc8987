"""One run per output directory: an advisory lock file `<out>/RUN.lock` holding the holder's host and pid.

    lock = RunLock(out); lock.acquire()     # raises RunLocked naming the holder; lock.release() at the end

The file is created with O_EXCL, so two starts cannot both win. While the run lives, a daemon thread
touches the file every `heartbeat_s`. A lock is stale, and taken over with a notice, when
- its holder is on this host and that process is gone (pid missing, or a new process under the same
  pid: the start time recorded in the lock differs), or
- its holder is on another host and the heartbeat has stopped: older than `STALE_S`, or not renewed
  while we watch for three heartbeat periods (a job requeued onto another node after a crash starts
  within a minute, not after the full `STALE_S`).
A lock written by this very process is ours: a Trainer run twice in one process (tests, the ablation)
does not lock itself out.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from mod_train.config import UserError

LOCK_NAME = "RUN.lock"
HEARTBEAT_S = 15.0
STALE_S = 300.0


class RunLocked(UserError, RuntimeError):
    """Another live run holds the output directory."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), None where /proc has no answer."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    def __init__(self, out, stale_s: float = STALE_S, heartbeat_s: float = HEARTBEAT_S):
        self.path = Path(out) / LOCK_NAME
        self.stale_s, self.heartbeat_s = stale_s, heartbeat_s
        pid = os.getpid()
        self.me = {"host": socket.gethostname(), "pid": pid, "start": _start_time(pid)}
        self._stop = threading.Event()
        self._thread = None

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"host": "?", "pid": -1, "unreadable": True}

    def _mtime(self) -> float | None:
        try:
            return self.path.stat().st_mtime
        except FileNotFoundError:
            return None

    def why_stale(self, h: dict) -> str | None:
        """The reason the lock `h` is stale, or None if its holder is alive."""
        if h.get("unreadable"):
            return "the lock file is unreadable"
        if h.get("host") == self.me["host"]:
            pid = int(h.get("pid", -1))
            if not _pid_alive(pid):
                return f"process {pid} no longer exists"
            if h.get("start") and _start_time(pid) not in (None, h["start"]):
                return f"process {pid} is a different process now"
            return None
        seen = self._mtime()
        if seen is None:
            return "the lock vanished"
        if time.time() - seen > self.stale_s:
            return f"no heartbeat for {time.time() - seen:.0f} s"
        deadline = time.monotonic() + 3 * self.heartbeat_s
        while time.monotonic() < deadline:
            time.sleep(min(1.0, self.heartbeat_s / 4))
            if self._mtime() != seen:
                return None
        return f"no heartbeat for {3 * self.heartbeat_s:.0f} s while we watched"

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({**self.me, "since": time.time()}, f)
        return True

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock removed by us may be re-taken by a racing starter
            if self._create():
                self._start_heartbeat()
                return
            h = self.holder()
            if h is None:
                continue
            if h.get("host") == self.me["host"] and h.get("pid") == self.me["pid"]:
                self._start_heartbeat()
                return
            why = self.why_stale(h)
            if why is None:
                raise RunLocked(
                    f"{self.path.parent} is in use by another run (host {h.get('host')}, pid {h.get('pid')}, "
                    f"lock {self.path}); wait for it, stop it, or use another --out. If that run is dead, "
                    f"delete {self.path}")
            print(f"[mod_train] taking over a stale run lock {self.path} (host {h.get('host')}, pid {h.get('pid')}: "
                  f"{why})", flush=True)
            self.path.unlink(missing_ok=True)
        raise RunLocked(f"could not take the run lock {self.path}: another run keeps taking it")

    def _start_heartbeat(self) -> None:
        if self._thread is not None:
            return

        def beat():
            while not self._stop.wait(self.heartbeat_s):
                try:
                    os.utime(self.path)
                except OSError:
                    return

        self._thread = threading.Thread(target=beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        h = self.holder()
        if h is not None and h.get("host") == self.me["host"] and h.get("pid") == self.me["pid"]:
            self.path.unlink(missing_ok=True)
