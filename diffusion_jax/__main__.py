"""Command line: ``python -m diffusion_jax <command> [options]`` (``--help`` after a command for its options).

Every command is a module of :mod:`diffusion_jax.apps` with ``main(argv) -> int``; all use argparse.
Bad input (a missing run, data set or weights file, an invalid option) exits with status 2 after printing
the traceback, causes included, and a last line ``error: <what to fix>``.
"""
from __future__ import annotations

import importlib
import sys
import traceback

# command -> (module under diffusion_jax.apps, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "train or resume a run: --config configs/<name>.py --workdir DIR [--config.key=value ...]"),
    "bench-nfe": ("bench_nfe", "sample quality (fd-pixels, kid-pixels, FID) versus NFE of a trained run"),
    "bench-solvers": ("bench_solvers", "exact-score sampler error versus NFE for every family (no network)"),
    "bench-toy": ("bench_toy", "train every family on a 2-D toy set and report sliced W2"),
    "bench-train": ("bench_train", "training steps/s for several n_steps_per_call values, with a bitwise check"),
    "bench-fields": ("bench_fields", "every force-field kernel and VE side by side (toy 2-D and digits)"),
    "bench-overhead": ("bench_overhead", "sampler cost: compile time and non-network share of a gDDIM sample"),
    "bpd": ("bpd", "bits/dim of a trained run through the probability-flow ODE"),
    "analyze": ("analyze", "learned vs optimal sampling trajectories of a trained run"),
    "demo": ("demo", "the embedded demo: toy and digits training, samples, quality versus NFE"),
    "tour": ("tour", "print the families and plot their marginals"),
    "import-checkpoint": ("import_checkpoint", "import a published checkpoint (--format score_sde) as a run directory"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "usage: python -m diffusion_jax <command> [options]\n\ncommands:\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(_usage() + f"\nerror: unknown command {command!r}", file=sys.stderr)
        return 2
    app = importlib.import_module(f"diffusion_jax.apps.{COMMANDS[command][0]}")
    try:
        return int(app.main(rest) or 0)
    except (FileNotFoundError, ValueError) as e:      # bad input: keep the traceback and causes, then the fix
        traceback.print_exception(e, file=sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
