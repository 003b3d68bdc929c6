"""``python -m diffusion_jax train --config configs/<name>.py --workdir DIR [--config.key=value ...]``.

A run directory resumes from its latest readable checkpoint. Any config field can be overridden on the command
line, score_sde style: ``--config.training.batch_size=256``, ``--config.model.kwargs.nf=64``,
``--config.ema_rates='(0.999,)'``.

Multi-host: run the same command once per process with ``--coordinator_address host:port --num_processes P
--process_id i`` (or the ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` environment).
A bad config value exits with status 2 and a one-line ``error:`` naming the field; a preempted run (SIGTERM)
saves a checkpoint and exits with status 0.
"""
from __future__ import annotations

import argparse
import sys

from diffusion_jax.training.configs import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffusion_jax train", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="configuration file (configs/*.py with get_config())")
    p.add_argument("--workdir", required=True, help="run directory: checkpoints, logs, samples; resumes if present")
    p.add_argument("--coordinator_address", default=None,
                   help="multi-host: host:port of process 0 (default $JAX_COORDINATOR_ADDRESS; unset: one process)")
    p.add_argument("--num_processes", type=int, default=None, help="multi-host: number of processes")
    p.add_argument("--process_id", type=int, default=None, help="multi-host: this process's index")
    args, overrides = p.parse_known_args(argv)
    from absl import logging
    logging.set_verbosity(logging.WARNING)          # orbax logs every checkpoint file at INFO
    from diffusion_jax.training.distributed import log
    from diffusion_jax.training.loop import train
    try:
        config = load_config(args.config, overrides)
        out = train(config, args.workdir, coordinator_address=args.coordinator_address,
                    num_processes=args.num_processes, process_id=args.process_id)
    except ConfigError as e:                        # a bad field: the message names it, nothing was written
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    what = "preempted after" if out["preempted"] else "trained"
    log(f"{what} steps {out['start']}..{out['step']} in {out['seconds']:.1f} s; workdir {args.workdir}")
    return 0
