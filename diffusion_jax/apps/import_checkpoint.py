"""``python -m diffusion_jax import-checkpoint --format {score_sde,cld_sgm,psld,gddim} PATH --config CONFIG --workdir RUN``.

Reads a checkpoint published by another code (no torch needed, restricted unpickler), maps every tensor onto the
library's network with a full shape check, and writes RUN as a trained run: ``bench-nfe``, ``bpd``, ``analyze`` and
the samplers then load it like one (EMA weights included). Config overrides as for ``train``.
"""
from __future__ import annotations

import argparse

from diffusion_jax.interop import FORMATS, import_checkpoint
from diffusion_jax.training.configs import load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffusion_jax import-checkpoint", description=__doc__.split("\n")[0])
    p.add_argument("path", help="the peer's checkpoint file (gddim: the file checkpoint_<n> or its folder)")
    p.add_argument("--format", required=True, choices=FORMATS, help="whose checkpoint it is")
    p.add_argument("--config", required=True, help="configuration matching the checkpoint (configs/*.py)")
    p.add_argument("--workdir", required=True, help="the run directory to write (must hold no checkpoints)")
    p.add_argument("--numerical-eps", type=float, default=None,
                   help="cld_sgm / psld: the peer's covariance regulariser numerical_eps, not recorded in its file "
                        "(default: its published setting: CLD-SGM 1e-9 on CIFAR-10, 1e-6 on CelebA-HQ; PSLD 1e-9)")
    args, overrides = p.parse_known_args(argv)
    config = load_config(args.config, overrides)
    out = import_checkpoint(args.format, args.path, config, args.workdir, numerical_eps=args.numerical_eps)
    print(f"imported {args.path} ({args.format}) into {out}")
    return 0
