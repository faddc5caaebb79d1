"""``--profile``: where a worker spends its time during a bench run, sampled by py-spy from outside.

py-spy attaches to the running worker (``--pid``), samples every thread's stack, and writes the raw
stacks when the worker exits. :func:`summary` attributes each sample to its innermost frame in the
project's own code (or the library function it is in), which is what the README's profile table shows.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def attach(pid: int, out: Path, rate: int = 100) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("py-spy") or str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "py-spy")
    if not Path(exe).exists():
        return None
    return subprocess.Popen(
        # --gil: only the thread holding the GIL, i.e. Python at work (threads waiting on I/O are left out).
        [
            exe,
            "record",
            "--pid",
            str(pid),
            "--rate",
            str(rate),
            "--gil",
            "--format",
            "raw",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def finish(proc: subprocess.Popen[bytes] | None, timeout: float = 60) -> None:
    if proc is not None:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()


def _where(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py)"
    name, _, loc = frame.partition(" (")
    path = loc.rsplit(":", 1)[0]
    return f"{name} ({path.rsplit('/', 1)[-1]})"


_OWN = ("pipeline/", "connectors/", "bench/", "localservices/")


def _own(frame: str) -> bool:
    return frame.partition(" (")[2].startswith(_OWN)


def summary(path: Path, top: int = 20) -> dict[str, Any]:
    """Shares of the samples: per stage (the step a stage thread was in) and per innermost frame (a
    library's, with the project's function that called it)."""
    stages: collections.Counter[str] = collections.Counter()
    frames: collections.Counter[str] = collections.Counter()
    total = 0
    if not path.exists():
        return {"samples": 0, "stages": [], "frames": []}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        parts = stack.split(";")
        stage = "other"
        for i, f in enumerate(parts):
            if f.startswith("Stage._process") and i + 1 < len(parts):
                stage = parts[i + 1].split(".")[0]
                break
            if f.startswith("Stage.run"):
                stage = "stage runtime"
        stages[stage] += n
        where = _where(parts[-1])
        if not _own(parts[-1]):
            caller = next((f for f in reversed(parts) if _own(f)), None)
            if caller is not None:
                where += " <- " + _where(caller)
        frames[where] += n
    return {
        "samples": total,
        "stages": [(t, n / total) for t, n in stages.most_common(10)] if total else [],
        "frames": [(f, n / total) for f, n in frames.most_common(top)] if total else [],
    }
