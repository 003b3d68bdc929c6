"""``python -m diffusion_jax train --config configs/<name>.py --workdir DIR [--config.key=value ...]``."""
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
        flags.mark_flags_as_required(["config", "workdir"])


def _main(argv) -> None:
    del argv
    from absl import logging
    logging.set_verbosity(logging.WARNING)          # orbax logs every checkpoint file at INFO
    from diffusion_jax.training.loop import train
    out = train(FLAGS.config, FLAGS.workdir)
    print(f"trained steps {out['start']}..{out['step']} in {out['seconds']:.1f} s; workdir {FLAGS.workdir}")


def main(argv: list[str]) -> None:
    """``argv``: the arguments after ``train``."""
    _define_flags()
    sys.path.insert(0, ".")                 # config files import diffusion_jax from the checkout
    app.run(_main, argv=["python -m diffusion_jax train"] + list(argv))
