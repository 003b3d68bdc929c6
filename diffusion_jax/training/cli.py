"""``python -m diffusion_jax train --config configs/<name>.py --workdir DIR [--config.key=value ...]``.

Multi-host: run the same command once per process with ``--coordinator_address host:port
--num_processes P --process_id i`` (or the ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
``JAX_PROCESS_ID`` environment). A bad config value exits with status 2 and a one-line ``error:``
message naming the field; a preempted run (SIGTERM) saves a checkpoint and exits with status 0.
"""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def _define_flags() -> None:
    if "config" not in FLAGS:
        config_flags.DEFINE_config_file("config", None, "training configuration file (configs/*.py)",
                                        lock_config=True)
        flags.DEFINE_string("workdir", None, "run directory: checkpoints, logs, samples; resumes if present")
        flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0 "
                            "(default: $JAX_COORDINATOR_ADDRESS; unset: a single process)")
        flags.DEFINE_integer("num_processes", None, "multi-host: number of processes ($JAX_NUM_PROCESSES)")
        flags.DEFINE_integer("process_id", None, "multi-host: this process's index ($JAX_PROCESS_ID)")
        flags.mark_flags_as_required(["config", "workdir"])


def _main(argv) -> None:
    del argv
    from absl import logging
    logging.set_verbosity(logging.WARNING)          # orbax logs every checkpoint file at INFO
    from diffusion_jax.configs import ConfigError
    from diffusion_jax.training.loop import train
    try:
        out = train(FLAGS.config, FLAGS.workdir, coordinator_address=FLAGS.coordinator_address,
                    num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    from diffusion_jax.training.distributed import log
    what = "preempted after" if out["preempted"] else "trained"
    log(f"{what} steps {out['start']}..{out['step']} in {out['seconds']:.1f} s; workdir {FLAGS.workdir}")


def main(argv: list[str]) -> None:
    """``argv``: the arguments after ``train``."""
    _define_flags()
    sys.path.insert(0, ".")                 # config files import diffusion_jax from the checkout
    app.run(_main, argv=["python -m diffusion_jax train"] + list(argv))
