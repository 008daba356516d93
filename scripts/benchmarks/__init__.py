"""Benchmarks that live in their own module; each exposes ``add_arguments(parser)`` and
``run(args) -> dict`` and is wired into ``scripts/bench.py``'s subcommand table."""
