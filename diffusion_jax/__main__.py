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
    if argv and argv[0] == "analyze":         # learned-vs-optimal trajectory report of a run
        from diffusion_jax.analysis.report import main as analyze_main
        return analyze_main(argv[1:]) or 0
    parser = argparse.ArgumentParser(prog="python -m diffusion_jax")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("analyze", help="learned vs optimal trajectories of a run: --workdir DIR [--out ...]")
    sub.add_parser("train", help="train: --config configs/<name>.py --workdir DIR [--config.key=value ...]")
    tour = sub.add_parser("tour", help="print the families and plot their marginals")
    tour.add_argument("--out", default="demo_out", help="output folder for the PNG")
    bench = sub.add_parser("bench-solvers", help="exact-score sampler error versus NFE for every family")
    bench.add_argument("--out", default="bench_out/solvers")
    bench.add_argument("--families", default=None, help="comma list (vp,cld,told,cdhold4,psld)")
    bench.add_argument("--samplers", default=None, help="comma list, see diffusion_jax.bench_solvers.SAMPLERS")
    bench.add_argument("--nfe", default=None, help="comma list of NFE (default 5,10,20,50,100,200,500,1000)")
    bench.add_argument("--n-samples", type=int, default=256)
    bench.add_argument("--tune", action="store_true",
                       help="measure the gddim defaults and write diffusion_jax/samplers/tuned_grids.json")
    over = sub.add_parser("bench-overhead", help="gDDIM sampler cost with a trivial fn vs DDPM++")
    over.add_argument("--family", default="cld")
    over.add_argument("--batch", type=int, default=256)
    over.add_argument("--nfe", type=int, default=50)
    over.add_argument("--net-batch", type=int, default=8, help="batch for timing the network forward")
    nfe = sub.add_parser("bench-nfe", help="sample quality (fd-pixels, kid-pixels, FID) versus NFE of a trained run")
    nfe.add_argument("--workdir", required=True, help="the trained run (checkpoints/ and config.json)")
    nfe.add_argument("--samplers", default="gddim,euler,heun",
                     help="comma list of sampler specs name[:key=value...], e.g. gddim,gddim:order=2,euler,heun,sscs")
    nfe.add_argument("--nfe", default="10,20,50,100", help="comma list of NFE budgets")
    nfe.add_argument("--metric", default="fd-pixels", choices=("fid", "fd-pixels", "kid-pixels"))
    nfe.add_argument("--n-samples", type=int, default=1000)
    nfe.add_argument("--seed", type=int, default=0, help="seed of the initial noise (shared by every cell)")
    nfe.add_argument("--ema", default=None, help="EMA rate to use (default: the largest in the run)")
    nfe.add_argument("--out", default=None, help="output folder (default RUN/bench_nfe)")
    nfe.add_argument("--batch", type=int, default=None,
                     help="sampling batch (default: all samples at once; each batch recompiles the solver)")
    nfe.add_argument("--ref", default=None, help="reference statistics .npz (default: cached under --out)")
    nfe.add_argument("--fid-weights", default=None,
                     help="pt_inception-2015-12-05-6726825d.pth (or $DIFFUSION_JAX_FID_WEIGHTS) for --metric fid")
    nfe.add_argument("--floor-split", default="test",
                     help="held-out split measured against the reference as the floor ('' to skip)")
    bpd = sub.add_parser("bpd", help="bits/dim of a trained run through the probability-flow ODE")
    bpd.add_argument("--workdir", required=True)
    bpd.add_argument("--n", type=int, default=200, help="number of examples (0: the whole split)")
    bpd.add_argument("--split", default=None, help="data split (default: config.data.eval_split, 'test')")
    bpd.add_argument("--trace", default="hutchinson", choices=("hutchinson", "exact"))
    bpd.add_argument("--probes", type=int, default=1, help="Hutchinson probes per example")
    bpd.add_argument("--t-eps", type=float, default=None, help="start time of the ODE (default: the family's t_min)")
    bpd.add_argument("--aux", default="forward", choices=("forward", "initial"),
                     help="auxiliary law r(a | x_0) of the bound for k >= 2 families")
    bpd.add_argument("--ema", default=None, help="EMA rate to use (default: the largest in the run)")
    bpd.add_argument("--seed", type=int, default=0)
    bpd.add_argument("--batch", type=int, default=64)
    bpd.add_argument("--rtol", type=float, default=1e-5)
    bpd.add_argument("--atol", type=float, default=1e-5)
    bpd.add_argument("--out", default=None, help="JSON path (default RUN/bpd_<split>_n<N>_<trace>_seed<S>.json)")
    args = parser.parse_args(argv)
    if args.command == "tour":
        from diffusion_jax.tour import run_tour
        run_tour(args.out)
    elif args.command == "bench-solvers":
        from diffusion_jax import bench_solvers
        split = lambda v: v.split(",") if v else None
        if args.tune:
            nfes = tuple(int(n) for n in args.nfe.split(",")) if args.nfe else bench_solvers.TUNE_NFES
            bench_solvers.tune(None, split(args.families) or bench_solvers.TUNE_FAMILIES, nfes)
        else:
            nfes = tuple(int(n) for n in args.nfe.split(",")) if args.nfe else bench_solvers.NFES
            bench_solvers.run(args.out, split(args.families), split(args.samplers), nfes, args.n_samples)
    elif args.command == "bench-overhead":
        from diffusion_jax import bench_overhead
        bench_overhead.run(args.family, args.batch, args.nfe, args.net_batch)
    elif args.command in ("bench-nfe", "bpd"):
        try:
            if args.command == "bench-nfe":
                from diffusion_jax import bench_nfe
                bench_nfe.run(args.workdir, args.samplers, args.nfe, args.metric, args.n_samples, args.seed,
                              args.ema, args.out, args.batch, args.ref, args.fid_weights, args.floor_split or None)
            else:
                from diffusion_jax import bpd as bpd_mod
                bpd_mod.run(args.workdir, args.n or None, args.split, args.trace, args.probes, args.t_eps,
                            args.aux, args.ema, args.seed, args.batch, args.rtol, args.atol, args.out)
        except (FileNotFoundError, ValueError) as e:      # bad arguments, missing run/data/weights: say the fix
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
