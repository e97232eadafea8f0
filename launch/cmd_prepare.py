"""`qshard prepare-default`: convert the embedded default model into the cache."""

from __future__ import annotations

import argparse

from engine.default_model import prepare_default


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="convert again even if already converted (replaces only the cache's own model directory)")


def run(args) -> int:
    print(prepare_default(force=args.force))
    return 0
