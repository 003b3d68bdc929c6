"""``python -m diffusion_jax analyze --workdir RUN``: learned vs optimal sampling trajectories of a trained run.

The report (:func:`diffusion_jax.analysis.report.run`) writes ``summary.md``, ``summary.json`` and figures.
"""
from __future__ import annotations

import argparse
import os
from typing import Sequence

from diffusion_jax import samplers
from diffusion_jax.analysis import report

def main(argv: Sequence[str] | None = None) -> int:
    """``python -m diffusion_jax analyze --workdir DIR [--out DIR] [--n 64] [--nfe 50] [--method gddim] ...``."""
    parser = argparse.ArgumentParser(prog="python -m diffusion_jax analyze",
                                     description="learned vs optimal sampling report for a trained run")
    parser.add_argument("--workdir", required=True, help="a trained run (checkpoints/ and config.json)")
    parser.add_argument("--out", default=None, help="output folder (default: WORKDIR/analysis)")
    parser.add_argument("--n", type=int, default=64, help="number of trajectories")
    parser.add_argument("--nfe", type=int, default=50, help="function evaluations per sampling run")
    parser.add_argument("--method", default="gddim", choices=samplers.METHODS,
                        help="sampler (explicit diffrax solvers such as heun can diverge at small t for k >= 2)")
    parser.add_argument("--order", type=int, default=None, help="gddim multistep order")
    parser.add_argument("--grid", default=None, help="time grid (uniform, quadratic, logsnr, edm)")
    parser.add_argument("--ema", default=None, help="EMA rate to analyse, or 'raw' (default: slowest EMA)")
    parser.add_argument("--data-limit", type=int, default=None, help="training points for the optimal denoiser")
    parser.add_argument("--heldout-limit", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(list(argv) if argv is not None else None)
    extra = {k: v for k, v in (("order", args.order), ("grid", args.grid)) if v is not None}
    out = args.out or os.path.join(args.workdir, "analysis")
    summary = report.run(args.workdir, out, n=args.n, nfe=args.nfe, method=args.method, ema=args.ema,
                  data_limit=args.data_limit, heldout_limit=args.heldout_limit, seed=args.seed, **extra)
    with open(os.path.join(out, "summary.md")) as f:
        print(f.read())
    print(f"report written to {out} ({summary['seconds']:.1f} s)")
    return 0
