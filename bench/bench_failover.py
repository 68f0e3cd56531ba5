"""Failover benchmark: kill the owner mid-write, take over on another replica, check the data.

A thin entry point; the logic is ``devtools.failover_bench`` (also ``tandem bench
failover``). Must not leave a cluster running that it started (always torn down).

    sudo .venv/bin/python bench/bench_failover.py --dir /tmp/tandem-bench-failover \
        --trials 10 [--mode sigkill|link-down] [--lease-ttl 2] [--json out.json]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# As in the CLI: gRPC's fork handlers can crash the children devcluster forks (ip, mount).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

# Run from a source checkout: devtools (the dev cluster) is not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devtools.failover_bench import main

if __name__ == "__main__":
    sys.exit(main())
