"""Benchmarks. Each prints one JSON document on stdout.

    python scripts/bench.py <name> [options]      # python scripts/bench.py --help lists them

Every benchmark is a module of ``scripts/benchmarks`` with ``NAME``, ``HELP``,
``add_arguments(parser)`` and ``run(args) -> dict``, listed in ``BENCHMARKS`` below.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

BENCHMARKS = [
    "latency",
    "peer_prefect",
    "sources",
    "ingress_server",
    "throughput",
    "listeners",
    "recovery",
    "tracked",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="name", required=True)
    runners = {}
    for module_name in BENCHMARKS:
        module = importlib.import_module(f"benchmarks.{module_name}")
        name = getattr(module, "NAME", module_name.replace("_", "-"))
        module.add_arguments(sub.add_parser(name, help=module.HELP))
        runners[name] = module.run
    args = parser.parse_args()
    # Ray's raylet and workers print warnings to the driver's stdout: keep stdout for the JSON.
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    before = os.getloadavg()
    try:
        doc = runners[args.name](args)
    finally:
        sys.stdout.flush()
        os.dup2(real_stdout, 1)
        os.close(real_stdout)
    # Other work on the machine skews every figure: every document says how busy it was.
    doc["machine"] = {
        "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    } | doc.get("machine", {})
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
