"""Reading py-spy's collapsed stacks (``--format raw``): where the samples went.

Each line of a raw profile is ``frame;frame;...;leaf COUNT`` with frames like
``function (path/to/file.py:123)``. :func:`hot_spots` gives the functions that were running
themselves (the leaf frame, *self* time) and the pacsflow functions with everything they
called (*total* time), each as a share of all samples of that profile.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

__all__ = ["hot_spots"]

_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")
# py-spy names files relative to their sys.path entry: "pacsflow/...", "pacsflow_uploader/...".
_PROJECT = re.compile(r"(^|/)(pacsflow|pacsflow_\w+|bench)/")
_ENTRY_POINTS = ("pacsflow/__main__.py", "pacsflow/cli/", "pacsflow/cli.py", "pacsflow/runtime.py")
# Leaves where a thread waits (for a socket, a queue, a child process): not work.
_WAITS = ("selectors.py:EpollSelector.select", "thread.py:_worker", "Connection._recv",
          "Condition.wait", "queue.py:Queue.get", "_recv_exact", "spawn_main", "Event.wait",
          "socket.py:SocketIO.readinto")


def _short(file: str) -> str:
    for marker in ("/site-packages/", "/shared/", "/services/", "/lib/python3"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def _name(frame: str) -> tuple[str, bool]:
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip(), False
    file = match["file"]
    return f"{_short(file)}:{match['function']}", _PROJECT.search(file) is not None


def hot_spots(profile: Path, top: int = 12) -> dict[str, object]:
    """The top self-time functions and the top pacsflow functions by total time.

    Shares are of the samples where a thread worked; samples whose leaf is a wait (a select,
    an idle worker thread, a blocking receive) are counted apart.
    """
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = waiting = 0
    for line in profile.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame for frame in stack.split(";") if frame]
        # py-spy puts the process and thread first ("process 123:..."; "thread (0x...)").
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        leaf = _name(frames[-1])[0]
        if any(wait in leaf for wait in _WAITS):
            waiting += count
            continue
        samples += count
        own[leaf] += count
        seen: set[str] = set()
        for frame in frames:
            name, ours = _name(frame)
            # The entry points hold every sample: they tell nothing.
            if name.startswith(_ENTRY_POINTS):
                continue
            if ours and name not in seen:
                seen.add(name)
                total[name] += count

    def share(counter: Counter[str]) -> list[dict[str, object]]:
        return [{"function": name, "samples": count,
                 "share": round(count / samples, 4) if samples else 0.0}
                for name, count in counter.most_common(top)]  # fmt: skip

    return {"profile": str(profile), "samples": samples, "waiting_samples": waiting,
            "self": share(own),
            "pacsflow_total": share(total)}
