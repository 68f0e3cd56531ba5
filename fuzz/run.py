"""Coverage-guided fuzzing of tandem's protocol code with atheris (libFuzzer).

    .venv/bin/pip install atheris
    .venv/bin/python -m fuzz.run --target replication_server --seconds 300

New inputs that reach new code land in ``fuzz/corpus/<target>/`` (minimised with
``--merge``); ``make test`` replays that corpus (tests/unit/test_fuzz_corpus.py). A crash
is written to ``fuzz/crashes/`` and fails the run: add it to the corpus once fixed.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def write_seeds(corpus: Path, target: str) -> None:
    from fuzz.seeds import seeds

    corpus.mkdir(parents=True, exist_ok=True)
    for data in seeds()[target]:
        (corpus / f"seed-{hashlib.sha1(data).hexdigest()[:16]}").write_bytes(data)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz.run")
    parser.add_argument("--target", required=True)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--merge", action="store_true",
                        help="minimise the corpus instead of fuzzing")
    args = parser.parse_args()
    import atheris  # type: ignore[import-untyped]

    with atheris.instrument_imports():
        from fuzz.targets import TARGETS
    if args.target not in TARGETS:
        parser.error(f"--target: one of {', '.join(TARGETS)}")
    corpus = HERE / "corpus" / args.target
    write_seeds(corpus, args.target)
    crashes = HERE / "crashes"
    crashes.mkdir(exist_ok=True)
    argv = [sys.argv[0], str(corpus), f"-artifact_prefix={crashes}/{args.target}-",
            "-max_len=16384", "-rss_limit_mb=2048"]
    if args.merge:
        fresh = corpus.with_name(corpus.name + ".merged")
        fresh.mkdir(exist_ok=True)
        argv = [sys.argv[0], "-merge=1", str(fresh), str(corpus)]
    else:
        argv.append(f"-max_total_time={args.seconds}")
    target = TARGETS[args.target]
    atheris.Setup(argv, target)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
