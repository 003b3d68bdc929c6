"""``python -m diffusion_jax train --config configs/<name>.py --workdir DIR [--config.key=value ...]``.

A run directory resumes from its latest checkpoint when it exists. Any config field can be overridden on
the command line, score_sde style: ``--config.training.batch_size=256``, ``--config.model.kwargs.nf=64``,
``--config.ema_rates='(0.999,)'``.
"""
from __future__ import annotations

import argparse

from diffusion_jax.training.configs import load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffusion_jax train", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="configuration file (configs/*.py with get_config())")
    p.add_argument("--workdir", required=True, help="run directory: checkpoints, logs, samples; resumes if present")
    args, overrides = p.parse_known_args(argv)
    config = load_config(args.config, overrides)
    from absl import logging
    logging.set_verbosity(logging.WARNING)          # orbax logs every checkpoint file at INFO
    from diffusion_jax.training.loop import train
    out = train(config, args.workdir)
    print(f"trained steps {out['start']}..{out['step']} in {out['seconds']:.1f} s; workdir {args.workdir}")
    return 0
