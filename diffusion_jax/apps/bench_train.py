"""Steps per second of the training step for several ``n_steps_per_call`` values, and a bitwise check.

    python -m diffusion_jax bench-train --config configs/digits_cld.py --steps 64 --k 1,4 \
        [--config.training.batch_size=128 ...]

For each k: a fresh state (the same init), one warm-up call (compilation, not timed), then ``steps``
steps in calls of k from the same data stream, timed to ``block_until_ready``. Prints steps/s per k
and whether the final states (params, optimiser, EMA) are bitwise equal to those of k = first value.
"""
from __future__ import annotations

import time

import jax
import numpy as np


def benchmark(config, steps: int, ks: list[int]) -> list[dict]:
    """[{k, steps_per_s, seconds, equal}] for each k (``steps`` a multiple of every k)."""
    from diffusion_jax.training import configs
    from diffusion_jax.data import data_shape, make_iterator
    from diffusion_jax.training.setup import build_experiment, make_mesh, shardings, state_initializer
    from diffusion_jax.training.step import batch_sharding_for, jit_train_step
    configs.validate(config)
    bad = [k for k in ks if k < 1 or steps % k]
    if bad:
        raise ValueError(f"--steps={steps} must be a positive multiple of every --k (bad: {bad})")
    mesh = make_mesh(config)
    exp = build_experiment(config, data_shape(config))
    replicated, _ = shardings(mesh)
    rows, reference = [], None
    for k in ks:
        iterator = make_iterator(config, config.training.batch_size)
        sharding = batch_sharding_for(mesh, k)
        step_fn = jit_train_step(exp, mesh, n_steps_per_call=k)

        def batch():
            local = next(iterator) if k == 1 else np.stack([next(iterator) for _ in range(k)])
            return jax.make_array_from_process_local_data(sharding, local)

        state = state_initializer(exp, replicated)()
        # Warm-up: compile on a copy (the step donates its input), then restart from the same init.
        warm, _ = step_fn(state_initializer(exp, replicated)(), batch())
        jax.block_until_ready(warm)
        iterator = make_iterator(config, config.training.batch_size)
        t0 = time.perf_counter()
        for _ in range(steps // k):
            state, metrics = step_fn(state, batch())
        jax.block_until_ready((state, metrics))
        seconds = time.perf_counter() - t0
        leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(state))]
        if reference is None:
            reference = leaves
        equal = all(np.array_equal(a, b) for a, b in zip(leaves, reference))
        rows.append(dict(k=k, steps_per_s=steps / seconds, seconds=seconds, equal=equal))
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m diffusion_jax bench-train --config configs/<name>.py [--steps 64] [--k 1,4] [--config.a=b ...]``."""
    import argparse
    from diffusion_jax.training.configs import load_config
    p = argparse.ArgumentParser(prog="python -m diffusion_jax bench-train", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="training configuration file (configs/*.py)")
    p.add_argument("--steps", type=int, default=64, help="timed steps per k")
    p.add_argument("--k", default="1,4", help="comma list of n_steps_per_call values")
    args, overrides = p.parse_known_args(argv)
    ks = [int(v) for v in args.k.split(",")]
    rows = benchmark(load_config(args.config, overrides), args.steps, ks)
    print(f"{'k':>3} {'steps/s':>9} {'seconds':>8}  bitwise equal to k={ks[0]}")
    for r in rows:
        print(f"{r['k']:>3} {r['steps_per_s']:>9.2f} {r['seconds']:>8.2f}  {r['equal']}")
    return 0
