"""Process identity: a pid plus its start time (``/proc/<pid>/stat`` field 22), so a pid the
kernel reused for another process is never taken for ours. The one reader of that file.

Must not: signal or wait for processes (the callers decide what to do with an identity).
"""

from __future__ import annotations

from pathlib import Path


def parse_proc_stat(text: str) -> tuple[str, int]:
    """(state letter, start time in clock ticks) from the text of /proc/<pid>/stat."""
    # Field 2 (comm) may hold spaces and parentheses: the fields we need follow the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def proc_state(pid: int) -> tuple[str, int] | None:
    """(state letter, start time) of ``pid``, or None if there is no such process."""
    try:
        return parse_proc_stat(Path(f"/proc/{pid}/stat").read_text())
    except (FileNotFoundError, ProcessLookupError):
        return None


def start_ticks(pid: int) -> int | None:
    """The start time of ``pid`` if it is running; None if gone, a zombie or dead (its
    descriptors are closed already)."""
    state = proc_state(pid)
    if state is None or state[0] in ("Z", "X"):
        return None
    return state[1]
