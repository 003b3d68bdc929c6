"""Command line: ``python -m diffusion_jax <command> ...``."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "train":           # absl + ml_collections flags (score_sde style)
        from diffusion_jax.training.cli import main as train_main
        train_main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m diffusion_jax")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train: --config configs/<name>.py --workdir DIR [--config.key=value ...]")
    tour = sub.add_parser("tour", help="print the families and plot their marginals")
    tour.add_argument("--out", default="demo_out", help="output folder for the PNG")
    bench = sub.add_parser("bench-solvers", help="exact-score sampler error versus NFE for every family")
    bench.add_argument("--out", default="bench_out/solvers")
    bench.add_argument("--families", default=None, help="comma list (vp,cld,told,cdhold4,psld)")
    bench.add_argument("--samplers", default=None, help="comma list, see diffusion_jax.bench_solvers.SAMPLERS")
    bench.add_argument("--nfe", default=None, help="comma list of NFE (default 5,10,20,50,100,200,500,1000)")
    bench.add_argument("--n-samples", type=int, default=256)
    over = sub.add_parser("bench-overhead", help="gDDIM sampler cost with a trivial fn vs DDPM++")
    over.add_argument("--family", default="cld")
    over.add_argument("--batch", type=int, default=256)
    over.add_argument("--nfe", type=int, default=50)
    over.add_argument("--net-batch", type=int, default=8, help="batch for timing the network forward")
    args = parser.parse_args(argv)
    if args.command == "tour":
        from diffusion_jax.tour import run_tour
        run_tour(args.out)
    elif args.command == "bench-solvers":
        from diffusion_jax import bench_solvers
        split = lambda v: v.split(",") if v else None
        nfes = tuple(int(n) for n in args.nfe.split(",")) if args.nfe else bench_solvers.NFES
        bench_solvers.run(args.out, split(args.families), split(args.samplers), nfes, args.n_samples)
    elif args.command == "bench-overhead":
        from diffusion_jax import bench_overhead
        bench_overhead.run(args.family, args.batch, args.nfe, args.net_batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
