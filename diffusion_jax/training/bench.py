"""Steps per second of the training step for several ``n_steps_per_call`` values, and a bitwise check.

    python -m diffusion_jax.training.bench --config configs/digits_cld.py --steps 64 --k 1,4 \
        [--config.training.batch_size=128 ...]

For each k: a fresh state (the same init), one warm-up call (compilation, not timed), then ``steps``
steps in calls of k from the same data stream, timed to ``block_until_ready``. Prints steps/s per k
and whether the final states (params, optimiser, EMA) are bitwise equal to those of k = first value.
"""
from __future__ import annotations

import sys
import time

import jax
import numpy as np


def benchmark(config, steps: int, ks: list[int]) -> list[dict]:
    """[{k, steps_per_s, seconds, equal}] for each k (``steps`` a multiple of every k)."""
    from diffusion_jax import configs
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


def main(argv: list[str]) -> None:
    from absl import app, flags
    from ml_collections import config_flags
    FLAGS = flags.FLAGS
    config_flags.DEFINE_config_file("config", None, "training configuration file", lock_config=False)
    flags.DEFINE_integer("steps", 64, "timed steps per k")
    flags.DEFINE_string("k", "1,4", "comma list of n_steps_per_call values")
    flags.mark_flags_as_required(["config"])

    def run(_):
        ks = [int(v) for v in FLAGS.k.split(",")]
        rows = benchmark(FLAGS.config, FLAGS.steps, ks)
        print(f"{'k':>3} {'steps/s':>9} {'seconds':>8}  bitwise equal to k={ks[0]}")
        for r in rows:
            print(f"{r['k']:>3} {r['steps_per_s']:>9.2f} {r['seconds']:>8.2f}  {r['equal']}")

    sys.path.insert(0, ".")
    app.run(run, argv=["python -m diffusion_jax.training.bench"] + list(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
