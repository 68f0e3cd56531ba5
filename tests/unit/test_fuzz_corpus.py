"""Replay the kept fuzz corpus (issue 11): every input the coverage-guided campaigns
(``python -m fuzz.run``) found interesting, and the seeds, through the same targets. A
regression that makes the codec, the handshake or the NBD server raise on any of them
fails here, without atheris."""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz.seeds import seeds
from fuzz.targets import TARGETS

CORPUS = Path(__file__).resolve().parents[2] / "fuzz" / "corpus"


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_the_kept_corpus_replays_cleanly(target: str) -> None:
    files = sorted(p for p in (CORPUS / target).iterdir() if p.is_file())
    assert len(files) >= 10, f"the {target} corpus is missing or was never grown"
    for path in files:
        TARGETS[target](path.read_bytes())


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_the_seeds_replay_cleanly(target: str) -> None:
    for data in seeds()[target]:
        TARGETS[target](data)


def test_a_tampered_handshake_never_authenticates_the_wrong_peer() -> None:
    """Flip each byte of each handshake message in turn: the server either refuses or
    still knows exactly who the client is."""
    for where in range(0, 120, 3):
        for what in (1, 0x80):
            TARGETS["handshake"](bytes([where, what]))
            TARGETS["handshake"](bytes([0, 0, where, what]))
            TARGETS["handshake"](bytes([0, 0, 0, 0, where, what]))
