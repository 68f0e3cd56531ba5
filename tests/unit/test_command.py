"""replication.command against real processes: exit codes, streams, time-outs, cancellation."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import pytest

from replication import command
from replication.command import (
    CommandError,
    CommandNotFound,
    CommandResult,
    CommandTimeout,
    run,
    run_async,
)

MISSING = "tandem-no-such-binary-3f9a"


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (an unreaped child counts as alive)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _wait_gone(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.02)
    return False


def _read_pids(path: Path, count: int, seconds: float = 5.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        lines = path.read_text().split() if path.exists() else []
        if len(lines) >= count:
            return [int(line) for line in lines]
        time.sleep(0.02)
    raise AssertionError(f"{path} never got {count} pids")


# -- run ---------------------------------------------------------------------------------


def test_true_succeeds_with_empty_output() -> None:
    result = run(["true"])
    assert result == CommandResult(("true",), 0, "", "")


def test_stdout_and_stderr_are_captured_separately() -> None:
    result = run(["sh", "-c", "echo out; echo err >&2"])
    assert (result.stdout, result.stderr) == ("out\n", "err\n")


def test_false_raises_command_error_with_details() -> None:
    with pytest.raises(CommandError) as info:
        run(["sh", "-c", "echo boom >&2; exit 3"])
    assert info.value.returncode == 3
    assert info.value.argv == ("sh", "-c", "echo boom >&2; exit 3")
    assert info.value.stderr == "boom\n"
    assert "boom" in str(info.value)
    assert type(info.value) is CommandError


def test_check_false_returns_the_failure() -> None:
    result = run(["false"], check=False)
    assert result.returncode == 1


def test_missing_binary_is_command_not_found() -> None:
    with pytest.raises(CommandNotFound) as info:
        run([MISSING, "--help"])
    assert info.value.returncode is None
    assert MISSING in str(info.value)


def test_stdin_is_fed_and_absent_stdin_is_devnull() -> None:
    assert run(["cat"], input=b"hello\x00world").stdout == "hello\x00world"
    # Without input the child must see EOF at once, never the caller's terminal.
    assert run(["cat"], timeout=5).stdout == ""


def test_environment_forces_c_locale_and_adds_extras() -> None:
    result = run(
        ["sh", "-c", 'echo "$LC_ALL $TANDEM_X"'],
        env_extra={"LC_ALL": "fr_FR.UTF-8", "TANDEM_X": "1"},
    )
    assert result.stdout == "C 1\n"


def test_undecodable_output_is_replaced_not_fatal() -> None:
    assert run(["printf", "\\377ok"]).stdout == "\ufffdok"


def test_shell_string_and_empty_argv_are_rejected() -> None:
    with pytest.raises(TypeError):
        run("echo hi")
    with pytest.raises(ValueError):
        run([])
    with pytest.raises(TypeError):
        run(["echo", 1])  # type: ignore[list-item]


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = f"sleep 60 & echo $! >> {pids}; echo $$ >> {pids}; wait"
    started = time.monotonic()
    with pytest.raises(CommandTimeout) as info:
        run(["sh", "-c", script], timeout=0.5)
    assert time.monotonic() - started < 5
    assert info.value.timeout == 0.5 and info.value.returncode is None
    grandchild, child = _read_pids(pids, 2)
    assert not _alive(child), "the child must be killed and reaped"
    assert _wait_gone(grandchild), "a helper the child forked must be killed too"


def test_one_debug_line_per_command(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=command.__name__)
    run(["true"])
    run(["false"], check=False)
    with pytest.raises(CommandNotFound):
        run([MISSING])
    lines = [r.getMessage() for r in caplog.records if r.name == command.__name__]
    assert len(lines) == 3
    assert lines[0].startswith("command true rc=0")
    assert "rc=1" in lines[1] and "not found" in lines[2]


def test_stdin_is_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=command.__name__)
    run(["cat"], input=b"s3cret")
    assert "s3cret" not in caplog.text


# -- run_async ---------------------------------------------------------------------------


def test_async_success_failure_and_stdin() -> None:
    async def scenario() -> None:
        assert (await run_async(["cat"], input=b"abc")).stdout == "abc"
        result = await run_async(["sh", "-c", "echo $LC_ALL"])
        assert result.stdout == "C\n"
        assert (await run_async(["false"], check=False)).returncode == 1
        with pytest.raises(CommandError) as info:
            await run_async(["sh", "-c", "echo nope >&2; exit 4"])
        assert (info.value.returncode, info.value.stderr) == (4, "nope\n")
        with pytest.raises(CommandNotFound):
            await run_async([MISSING])

    asyncio.run(scenario())


def test_async_timeout_kills_and_reaps(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = f"sleep 60 & echo $! >> {pids}; echo $$ >> {pids}; wait"

    async def scenario() -> None:
        with pytest.raises(CommandTimeout):
            await run_async(["sh", "-c", script], timeout=0.5)

    started = time.monotonic()
    asyncio.run(scenario())
    assert time.monotonic() - started < 5
    grandchild, child = _read_pids(pids, 2)
    assert not _alive(child)
    assert _wait_gone(grandchild)


def test_async_cancellation_kills_the_child(tmp_path: Path) -> None:
    pids = tmp_path / "pids"

    async def scenario() -> None:
        task = asyncio.create_task(run_async(["sh", "-c", f"echo $$ > {pids}; sleep 60"]))
        while not pids.exists() or not pids.read_text().strip():
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    (child,) = _read_pids(pids, 1)
    assert not _alive(child)


def test_start_daemon_runs_a_long_lived_child_in_its_own_session(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    with open(out, "wb") as log:
        proc = command.start_daemon(
            ["sh", "-c", 'echo "$LC_ALL $EXTRA"; read -r line || echo eof; sleep 30'],
            stdout=log, env_extra={"EXTRA": "x"})
    try:
        assert os.getsid(proc.pid) == proc.pid  # a signal to our group does not reach it
        deadline = time.monotonic() + 10
        while "eof" not in out.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert out.read_text().split("\n")[:2] == ["C x", "eof"]  # C locale; stdin /dev/null
    finally:
        proc.kill()
        proc.wait()


def test_start_daemon_refuses_what_run_refuses() -> None:
    with pytest.raises(CommandNotFound):
        command.start_daemon(["/nonexistent/tandem-helper"])
    with pytest.raises(TypeError):
        command.start_daemon("sleep 1")  # a str is a Sequence[str]: refused at run time


def test_start_piped_talks_over_stdin_and_stdout_in_our_group() -> None:
    async def go() -> tuple[bytes, int, int]:
        proc = await command.start_piped(["sh", "-c", 'read -r line; echo "got $line $LC_ALL"'])
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"args\n")
        await proc.stdin.drain()
        line = await asyncio.wait_for(proc.stdout.readline(), 10)
        group = os.getpgid(proc.pid)
        return line, group, await proc.wait()

    line, group, rc = asyncio.run(go())
    assert line == b"got args C\n" and rc == 0
    assert group == os.getpgid(0)  # part of us: it goes when our group is signalled
