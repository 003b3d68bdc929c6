"""The training loop: ``train(config, workdir)``, resuming automatically from the workdir's checkpoints.

Per step: this process's rows of the global batch -> a global array on the mesh
(``jax.make_array_from_process_local_data``) -> the jitted step. Metrics stay on device and are read
every ``log_every`` steps (so the host does not stall the device each step); a non-finite loss found
there stops the run with ``FloatingPointError`` before any later checkpoint is written.

Outputs under ``workdir``: ``checkpoints/`` (orbax), TensorBoard scalars and sample grids (clu writers),
``metrics.csv`` (step, loss, grad norm, steps/s), ``samples/step_<n>.png`` every ``sample_every`` steps.
"""
from __future__ import annotations

import csv
import os
import time
from typing import Any

import jax
import numpy as np

from diffusion_jax.training import configs
from diffusion_jax.data import data_shape as data_shape_of, make_iterator, to_image_space
from diffusion_jax.training.checkpoint import Checkpointer, abstract_like
from diffusion_jax.training.sampling import sample_data, save_samples
from diffusion_jax.training.setup import Experiment, build_experiment, make_mesh, shardings
from diffusion_jax.training.state import create_state
from diffusion_jax.training.step import jit_train_step


class _MetricsLog:
    """metrics.csv, truncated to the resumed step so a killed run leaves no duplicate rows."""

    FIELDS = ("step", "loss", "grad_norm", "steps_per_s")

    def __init__(self, path: str, resume_step: int):
        self.path = path
        rows = []
        if os.path.exists(path):
            with open(path) as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, self.FIELDS)
            w.writeheader()
            w.writerows(rows)

    def append(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.FIELDS).writerow(row)


def _maybe_initialize_distributed() -> None:
    """Multi-host: ``jax.distributed.initialize`` when a coordinator is configured in the environment."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS") and jax.process_count() == 1:
        jax.distributed.initialize()


def train(config, workdir: str, *, stop_after: int | None = None) -> dict:
    """Train (or resume) the run in ``workdir``; returns a summary dict.

    ``stop_after``: return after this many steps in this call (tests use it to stop mid-run).
    """
    configs.validate(config)
    _maybe_initialize_distributed()
    os.makedirs(workdir, exist_ok=True)
    tcfg = config.training
    mesh = make_mesh(config)                             # checks batch % devices before any compile
    shape = data_shape_of(config)
    exp: Experiment = build_experiment(config, shape)
    iterator = make_iterator(config, tcfg.batch_size)    # fails early when the data set is missing
    replicated, batch_sharding = shardings(mesh)

    state = create_state(exp.init_params(config.seed), exp.tx, config.ema_rates, config.seed)
    state = jax.device_put(state, replicated)
    ckpt = Checkpointer(workdir, keep=tcfg.keep, async_save=tcfg.async_checkpoints)
    start = 0
    if ckpt.latest_step() is not None:
        state, data_state, start = ckpt.restore(abstract_like(state, replicated))
        iterator.set_state(data_state)
        print(f"resumed from step {start} ({ckpt.directory})", flush=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))

    from clu import metric_writers, periodic_actions
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    progress = periodic_actions.ReportProgress(num_train_steps=tcfg.num_steps, writer=writer,
                                               every_steps=tcfg.log_every)
    log = _MetricsLog(os.path.join(workdir, "metrics.csv"), start)
    step_fn = jit_train_step(exp, mesh)

    pending: list[tuple[int, dict]] = []
    t_last, step_last = time.perf_counter(), start

    def flush(step: int) -> None:
        nonlocal t_last, step_last
        if not pending:
            return
        got = jax.device_get([m for _, m in pending])
        bad = [s for (s, _), m in zip(pending, got) if int(m["nonfinite"])]
        pending.clear()
        if bad:
            raise FloatingPointError(
                f"non-finite loss or gradient at step {bad[0]}: training stopped, the latest checkpoint "
                f"(step {ckpt.latest_step()}) in {ckpt.directory} is the last good state. Lower "
                f"config.optim.lr, set config.optim.grad_clip, or check the data for NaN/inf")
        now = time.perf_counter()
        rate = (step - step_last) / max(now - t_last, 1e-9)
        t_last, step_last = now, step
        loss = float(np.mean([m["loss"] for m in got]))
        gnorm = float(np.mean([m["grad_norm"] for m in got]))
        writer.write_scalars(step, {"loss": loss, "grad_norm": gnorm})
        log.append(dict(step=step, loss=f"{loss:.6g}", grad_norm=f"{gnorm:.6g}", steps_per_s=f"{rate:.4g}"))
        if jax.process_index() == 0:
            eta = (tcfg.num_steps - step) / max(rate, 1e-9)
            print(f"step {step}/{tcfg.num_steps}  loss {loss:.4g}  grad norm {gnorm:.3g}  {rate:.2f} steps/s  "
                  f"ETA {eta / 60:.1f} min", flush=True)

    step = start
    end = tcfg.num_steps if stop_after is None else min(tcfg.num_steps, start + stop_after)
    t0 = time.perf_counter()
    try:
        while step < end:
            local = next(iterator)
            batch = jax.make_array_from_process_local_data(batch_sharding, local)
            state, metrics = step_fn(state, batch)
            step += 1
            pending.append((step, metrics))
            progress(step)
            if step % tcfg.log_every == 0 or step == tcfg.num_steps:
                flush(step)
            if step % tcfg.ckpt_every == 0 or step == tcfg.num_steps:
                flush(step)                              # never checkpoint past a NaN
                ckpt.save(state, iterator.get_state(), config.to_json_best_effort())
            if tcfg.sample_every and step % tcfg.sample_every == 0:
                ema = next(iter(state.ema.values()))
                x = sample_data(exp, ema, jax.random.PRNGKey(config.seed + 1), min(64, config.sampling.num_samples),
                                config.sampling.method, config.sampling.nfe)
                path = save_samples(x, config, os.path.join(workdir, "samples", f"step_{step:08d}.png"))
                if x.ndim == 4:
                    writer.write_images(step, {"samples": to_image_space(x[:16])})
                print(f"samples at step {step}: {path}", flush=True)
        flush(step)
    finally:
        ckpt.wait()
        ckpt.close()
        writer.flush()
    return dict(state=state, step=step, start=start, seconds=time.perf_counter() - t0, experiment=exp,
                iterator_state=iterator.get_state())


def load_run(workdir: str, config=None, step: int | None = None) -> tuple[Experiment, Any]:
    """(experiment, train state) of a finished or running workdir (config read from its checkpoint)."""
    import json
    import ml_collections
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise FileNotFoundError(f"no checkpoints in {workdir}: train first with "
                                f"`python -m diffusion_jax train --config ... --workdir {workdir}`")
    ckpt = Checkpointer(workdir, async_save=False)
    if ckpt.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt.directory}: train first with "
                                f"`python -m diffusion_jax train --config ... --workdir {workdir}`")
    if config is None:
        with open(os.path.join(workdir, "config.json")) as f:
            config = ml_collections.ConfigDict(json.load(f))
        _retuple(config)
    exp = build_experiment(config, data_shape_of(config))
    mesh = make_mesh(config)
    replicated, _ = shardings(mesh)
    state = create_state(exp.init_params(config.seed), exp.tx, config.ema_rates, config.seed)
    state, _, _ = ckpt.restore(abstract_like(jax.device_put(state, replicated), replicated), step)
    ckpt.close()
    return exp, state


def _retuple(config) -> None:
    """JSON turns tuples into lists; the networks expect tuples for their sequence fields."""
    for key, value in config.items():
        if isinstance(value, list):
            config[key] = tuple(value)
        elif hasattr(value, "items"):
            _retuple(value)
