"""The training loop: ``train(config, workdir)``, resuming automatically from the workdir's checkpoints.

Per compiled call (``n_steps_per_call`` steps): this process's contiguous block of the global batch
-> a global array on the mesh (``jax.make_array_from_process_local_data``) -> the jitted step. Metrics
stay on device and are read every ``log_every`` steps (so the host does not stall the device each step); a non-finite loss found
there stops the run with ``FloatingPointError`` before any later checkpoint is written.

Outputs under ``workdir``: ``checkpoints/`` (orbax; every process writes its part), and from process 0
alone: ``config.json``, TensorBoard scalars and sample grids (clu writers; ``training.tensorboard=False``
skips them), ``metrics.csv`` (step, loss, grad norm, steps/s), ``samples/step_<n>.png`` every ``sample_every``
steps. Every process logs to its own stdout (prefixed ``[process i/P]`` when P > 1).
"""
from __future__ import annotations

import csv
import os
import time
from typing import Any

import jax
import numpy as np

from diffusion_jax.training import configs
from diffusion_jax.data import Checkpointable, data_shape as data_shape_of, make_iterator, to_image_space
from diffusion_jax.training import distributed
from diffusion_jax.training.checkpoint import Checkpointer
from diffusion_jax.training.sampling import compile_sampler, prior_sampler, save_samples
from diffusion_jax.training.setup import (Experiment, abstract_state, build_experiment, make_mesh, shardings,
                                          state_initializer)
from diffusion_jax.training.state import pick_ema
from diffusion_jax.training.step import batch_sharding_for, jit_train_step


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


def train(config, workdir: str, *, stop_after: int | None = None, coordinator_address: str | None = None,
          num_processes: int | None = None, process_id: int | None = None) -> dict:
    """Train (or resume) the run in ``workdir``; returns a summary dict.

    Order of start-up: validate the config (pure Python) -> ``jax.distributed.initialize`` when a
    coordinator is configured (arguments or ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
    ``JAX_PROCESS_ID``; see :mod:`.distributed`) -> mesh (``jax.make_mesh``, batch divisibility) -> data
    -> state (restored into a ``jax.eval_shape`` target, or initialised under jit with its sharding).
    Nothing is compiled or written before the config and the mesh are checked.

    ``stop_after``: return after this many steps in this call (tests use it to stop mid-run).
    A SIGTERM (preemption) saves a checkpoint at the step all processes agree on and returns with
    ``preempted=True``; rerunning resumes there.
    """
    configs.validate(config)
    distributed.initialize(coordinator_address, num_processes, process_id)
    log = distributed.log
    primary = distributed.is_primary()
    tcfg = config.training
    k = tcfg.n_steps_per_call
    if stop_after is not None and stop_after % k:
        raise configs.ConfigError(f"stop_after={stop_after} is not a multiple of "
                                  f"config.training.n_steps_per_call={k}")
    mesh = make_mesh(config)                             # checks batch % devices before any compile
    exp: Experiment = build_experiment(config, data_shape_of(config))
    iterator = make_iterator(config, tcfg.batch_size)    # fails early when the data set is missing
    replicated, _ = shardings(mesh)
    batch_sharding = batch_sharding_for(mesh, k)

    ckpt = Checkpointer(workdir, keep=tcfg.keep, async_save=tcfg.async_checkpoints, log=log)
    data_ckpt = Checkpointable(iterator)
    start = 0
    if ckpt.latest_step() is not None:
        try:
            state, start = ckpt.restore(abstract_state(exp, replicated), data_ckpt)
        except BaseException:
            ckpt.close()
            raise
        log(f"resumed from step {start} ({ckpt.directory})")
    else:
        for name in ckpt.incomplete_steps():
            log(f"checkpoint {name} in {ckpt.directory} is an interrupted write (incomplete): skipped, "
                f"starting from step 0")
        state = state_initializer(exp, replicated)()
    if primary:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    writer = None
    if primary and tcfg.tensorboard:
        # Only process 0 writes summaries (every process logs the same all-reduced metrics). Imported here:
        # clu's writers load TensorFlow, about 4 s of start-up that a run with tensorboard=False skips.
        from clu import metric_writers
        writer = metric_writers.create_default_writer(workdir)
    metrics_log = _MetricsLog(os.path.join(workdir, "metrics.csv"), start) if primary else None
    step_fn = jit_train_step(exp, mesh, n_steps_per_call=k)
    if tcfg.sample_every:
        n_samples = min(64, config.sampling.num_samples)
        draw = compile_sampler(exp, config.sampling.method, config.sampling.nfe, mesh=mesh,
                               **configs.sampling_options(config.sampling))
        prior = prior_sampler(exp, n_samples, mesh)
        sample_key = jax.random.PRNGKey(config.seed + 1)
    preemption = distributed.Preemption()

    pending: list[tuple[int, dict]] = []
    t_last, step_last = time.perf_counter(), start

    def flush(step: int) -> None:
        nonlocal t_last, step_last
        if not pending:
            return
        got = jax.device_get([m for _, m in pending])
        rows = []
        for (s, _), m in zip(pending, got):             # per call: metrics of its k steps
            nonfinite = np.atleast_1d(m["nonfinite"])
            for j in range(len(nonfinite)):
                rows.append((s - len(nonfinite) + 1 + j, float(np.atleast_1d(m["loss"])[j]),
                             float(np.atleast_1d(m["grad_norm"])[j]), int(nonfinite[j])))
        pending.clear()
        bad = [r[0] for r in rows if r[3]]
        if bad:
            raise FloatingPointError(
                f"non-finite loss or gradient at step {bad[0]}: training stopped, the latest checkpoint "
                f"(step {ckpt.latest_step()}) in {ckpt.directory} is the last good state. Lower "
                f"config.optim.lr, set config.optim.grad_clip, or check the data for NaN/inf")
        now = time.perf_counter()
        rate = (step - step_last) / max(now - t_last, 1e-9)
        t_last, step_last = now, step
        loss = float(np.mean([r[1] for r in rows]))
        gnorm = float(np.mean([r[2] for r in rows]))
        if writer is not None:
            writer.write_scalars(step, {"loss": loss, "grad_norm": gnorm, "steps_per_s": rate})
        if metrics_log is not None:
            metrics_log.append(dict(step=step, loss=f"{loss:.6g}", grad_norm=f"{gnorm:.6g}",
                                    steps_per_s=f"{rate:.4g}"))
        eta = (tcfg.num_steps - step) / max(rate, 1e-9)
        log(f"step {step}/{tcfg.num_steps}  loss {loss:.4g}  grad norm {gnorm:.3g}  {rate:.2f} steps/s  "
            f"ETA {eta / 60:.1f} min")

    def next_batch():
        if k == 1:
            local = next(iterator)
        else:
            local = np.stack([next(iterator) for _ in range(k)])
        return jax.make_array_from_process_local_data(batch_sharding, local)

    step = start
    end = tcfg.num_steps if stop_after is None else min(tcfg.num_steps, start + stop_after)
    preempted = False
    t0 = time.perf_counter()
    try:
        while step < end:
            state, metrics = step_fn(state, next_batch())
            step += k
            pending.append((step, metrics))
            # Every process checks every step number (the sync protocol needs each of them).
            preempted = any([preemption.reached(s, ckpt.manager) for s in range(step - k + 1, step + 1)])
            if step % tcfg.log_every == 0 or step == tcfg.num_steps or preempted:
                flush(step)
            if step % tcfg.ckpt_every == 0 or step == tcfg.num_steps or preempted:
                flush(step)                              # never checkpoint past a NaN
                ckpt.save(state, data_ckpt, config.to_json_best_effort())
            if preempted:
                ckpt.wait()
                log(f"preempted (SIGTERM): checkpoint saved at step {step} in {ckpt.directory}; "
                    f"rerun the same command to resume")
                break
            if tcfg.sample_every and step % tcfg.sample_every == 0:
                _, ema = pick_ema(state)
                x = np.asarray(draw(ema, prior(sample_key), jax.random.fold_in(sample_key, 1)))
                if primary:
                    path = save_samples(x, config, os.path.join(workdir, "samples", f"step_{step:08d}.png"))
                    if writer is not None and x.ndim == 4:
                        writer.write_images(step, {"samples": to_image_space(x[:16])})
                    log(f"samples at step {step}: {path}")
        flush(step)
    finally:
        preemption.close()
        ckpt.wait()
        ckpt.close()
        if writer is not None:
            writer.flush()
    return dict(state=state, step=step, start=start, seconds=time.perf_counter() - t0, experiment=exp,
                iterator_state=iterator.get_state(), preempted=preempted)


def load_run(workdir: str, config=None, step: int | None = None) -> tuple[Experiment, Any]:
    """(experiment, train state) of a finished or running workdir.

    The config is the one saved in the checkpoint (``config`` overrides it, e.g. to change sampling
    settings); training settings it predates take their defaults (:func:`.configs.complete_saved`). The
    state is restored into a ``jax.eval_shape`` target, replicated over this process's mesh (no throw-away
    initialisation).
    """
    import ml_collections
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise FileNotFoundError(f"no checkpoints in {workdir}: train first with "
                                f"`python -m diffusion_jax train --config ... --workdir {workdir}`")
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {ckpt.directory}: train first with "
                                    f"`python -m diffusion_jax train --config ... --workdir {workdir}`")
        if config is None:
            saved, _ = ckpt.restore_config(step)
            config = ml_collections.ConfigDict(saved)
            _retuple(config)
            configs.complete_saved(config)          # a run written before a training setting existed
        exp = build_experiment(config, data_shape_of(config))
        mesh = make_mesh(config)
        replicated, _ = shardings(mesh)
        state, _ = ckpt.restore(abstract_state(exp, replicated), step=step)
    finally:
        ckpt.close()
    return exp, state


def _retuple(config) -> None:
    """JSON turns tuples into lists; the networks expect tuples for their sequence fields."""
    for key, value in config.items():
        if isinstance(value, list):
            config[key] = tuple(value)
        elif hasattr(value, "items"):
            _retuple(value)
