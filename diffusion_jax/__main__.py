"""Command line: ``python -m diffusion_jax <command> ...``."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffusion_jax")
    sub = parser.add_subparsers(dest="command", required=True)
    tour = sub.add_parser("tour", help="print the families and plot their marginals")
    tour.add_argument("--out", default="demo_out", help="output folder for the PNG")
    args = parser.parse_args(argv)
    if args.command == "tour":
        from diffusion_jax.tour import run_tour
        run_tour(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
