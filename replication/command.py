"""The project's one subprocess chokepoint: run an argv, collect its output, classify failure.

Every external program (lvm tools, blkdiscard, mkfs, mount, ...) is run by ``run`` or its
async twin ``run_async``; every long-lived child is started by ``start_daemon`` (nbdfuse,
etcd, a dev cluster's processes: their own session) or ``start_piped`` (a volume's target,
driven over its stdin and stdout), and nowhere else, so locale, logging and error types are
the same everywhere. This module must not: accept a shell string, let the
child inherit the caller's locale (callers parse C-locale messages), leave a child or its
descendants running after a time-out or cancellation, or log stdin (it may carry secrets).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO

from replication.errors import CommandError, CommandNotFound, CommandTimeout

__all__ = [
    "CommandError",
    "CommandNotFound",
    "CommandResult",
    "CommandTimeout",
    "run",
    "run_async",
]

log = logging.getLogger(__name__)

# After SIGKILL a child dies at once; this only bounds the wait for a descendant that left
# our process group and still holds the output pipes.
_REAP_GRACE_SECONDS = 5.0


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def run(
    argv: Sequence[str],
    *,
    timeout: float = 60,
    input: bytes | None = None,
    check: bool = True,
    env_extra: Mapping[str, str] | None = None,
) -> CommandResult:
    """Run ``argv`` (no shell) to completion and return its decoded output.

    Raises CommandNotFound when the binary is missing, CommandTimeout after ``timeout``
    seconds (the child's whole process group is killed and reaped first), and CommandError
    when ``check`` is set and the exit status is not zero.
    """
    args, env = _prepare(argv, env_extra)
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            close_fds=True,
            # Own session = own process group, so a time-out can kill helpers it forked too.
            start_new_session=True,
        )
    except OSError as exc:
        raise _spawn_error(args, exc, started) from exc
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        err_text = _kill_and_reap(proc)
        _log_outcome(args, f"timeout after {timeout:g}s", started)
        raise CommandTimeout(args, timeout, err_text) from None
    except BaseException:
        _kill_and_reap(proc)
        _log_outcome(args, "interrupted", started)
        raise
    return _finish(args, proc.returncode, out, err, check, started)


def start_daemon(
    argv: Sequence[str],
    *,
    stdout: int | IO[bytes] = subprocess.DEVNULL,
    stderr: int | IO[bytes] = subprocess.DEVNULL,
    env_extra: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a long-lived child (no shell, stdin from /dev/null): nbdfuse, etcd, a dev
    cluster's processes. Its own session, so a signal aimed at our process group (a Ctrl-C, a
    container stop) never reaches it and its owner stops it in order. The caller keeps the
    Popen and reaps it (a plain Popen: asyncio's transport would kill the child on GC).

    Raises CommandNotFound when the binary is missing, CommandError when it cannot start.
    """
    args, env = _prepare(argv, env_extra)
    started = time.monotonic()
    try:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                env=env, close_fds=True, start_new_session=True)
    except OSError as exc:
        raise _spawn_error(args, exc, started) from exc
    log.debug("started pid=%d %s", proc.pid, shlex.join(args))
    return proc


async def start_piped(
    argv: Sequence[str], *, stderr: int | IO[bytes] = subprocess.DEVNULL,
) -> asyncio.subprocess.Process:
    """Start a long-lived child the caller talks to over its stdin and stdout (a volume's
    target process: its arguments in, READY or FAILED out), for the event loop. Unlike
    ``start_daemon`` it stays in our process group: it is part of us, and goes when our
    group is signalled. Raises CommandNotFound / CommandError as ``start_daemon`` does."""
    args, env = _prepare(argv, None)
    started = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=env,
            close_fds=True)
    except OSError as exc:
        raise _spawn_error(args, exc, started) from exc
    log.debug("started pid=%d %s", proc.pid, shlex.join(args))
    return proc


async def run_async(
    argv: Sequence[str],
    *,
    timeout: float = 60,
    input: bytes | None = None,
    check: bool = True,
    env_extra: Mapping[str, str] | None = None,
) -> CommandResult:
    """``run`` for the event loop: same arguments, result and errors.

    Cancelling the awaiting task kills and reaps the child before the cancellation propagates.
    """
    args, env = _prepare(argv, env_extra)
    started = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            close_fds=True,
            start_new_session=True,
        )
    except OSError as exc:
        raise _spawn_error(args, exc, started) from exc
    try:
        out, err = await asyncio.wait_for(proc.communicate(input), timeout)
    except TimeoutError:
        await _kill_and_reap_async(proc)
        _log_outcome(args, f"timeout after {timeout:g}s", started)
        raise CommandTimeout(args, timeout) from None
    except BaseException:
        await _kill_and_reap_async(proc)
        _log_outcome(args, "cancelled", started)
        raise
    assert proc.returncode is not None  # communicate() returns only after the child exited
    return _finish(args, proc.returncode, out, err, check, started)


def _prepare(
    argv: Sequence[str], env_extra: Mapping[str, str] | None
) -> tuple[list[str], dict[str, str]]:
    # A str is a Sequence[str] too; accepting it would run each character as an argument.
    if isinstance(argv, str | bytes):
        raise TypeError("argv must be a list of arguments, not a string (there is no shell)")
    args = list(argv)
    if not args:
        raise ValueError("argv is empty")
    if not all(isinstance(arg, str) for arg in args):
        raise TypeError(f"every argument must be a str: {args!r}")
    env = dict(os.environ)
    if env_extra:
        env.update(env_extra)
    # Set last so env_extra cannot undo it: callers match on untranslated messages.
    env["LC_ALL"] = "C"
    return args, env


def _spawn_error(args: list[str], exc: OSError, started: float) -> CommandError:
    if isinstance(exc, FileNotFoundError):
        _log_outcome(args, "not found", started)
        return CommandNotFound(args, str(exc))
    _log_outcome(args, f"spawn failed: {exc}", started)
    return CommandError(args, None, str(exc))


def _finish(
    args: list[str], returncode: int, out: bytes, err: bytes, check: bool, started: float
) -> CommandResult:
    _log_outcome(args, f"rc={returncode}", started)
    result = CommandResult(tuple(args), returncode, _decode(out), _decode(err))
    if check and returncode != 0:
        raise CommandError(args, returncode, result.stderr)
    return result


def _decode(data: bytes | None) -> str:
    # Tool output is not guaranteed UTF-8 (device labels, paths); never fail on it.
    return (data or b"").decode("utf-8", errors="replace")


def _log_outcome(args: list[str], outcome: str, started: float) -> None:
    elapsed_ms = (time.monotonic() - started) * 1000
    log.debug("command %s %s in %.1fms", shlex.join(args), outcome, elapsed_ms)


def _kill_group(proc: subprocess.Popen[bytes] | asyncio.subprocess.Process) -> None:
    # Only while unreaped: a reaped child's pid (= its group id) may already be reused.
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _kill_and_reap(proc: subprocess.Popen[bytes]) -> str:
    """Kill the child's process group, wait for it, and return whatever stderr it wrote."""
    _kill_group(proc)
    try:
        _, err = proc.communicate(timeout=_REAP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        # A descendant escaped the group and keeps the pipes open: stop reading, still reap.
        proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        return ""
    return _decode(err)


async def _kill_and_reap_async(proc: asyncio.subprocess.Process) -> None:
    _kill_group(proc)
    try:
        await asyncio.wait_for(proc.wait(), _REAP_GRACE_SECONDS)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        log.warning("child pid %d not reaped %gs after SIGKILL", proc.pid, _REAP_GRACE_SECONDS)
