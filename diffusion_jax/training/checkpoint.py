"""Checkpoints with orbax: train state (params, optimiser, EMA, rng, step), data-iterator state, config.

Saving is asynchronous (the step loop goes on while the arrays are written) and atomic (orbax writes
to a temporary directory and renames it when complete), so a run killed mid-save resumes from the
previous complete checkpoint. ``keep`` bounds how many are kept.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from diffusion_jax.training.state import TrainState


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "config"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, data_state: dict, config_json: str) -> None:
        step = int(jax.device_get(state.step))
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(json.loads(config_json))))

    def restore(self, abstract_state: TrainState, step: int | None = None) -> tuple[TrainState, dict, int]:
        """(state, data-iterator state, step) of ``step`` (default: the latest complete checkpoint)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        except Exception as e:
            raise RuntimeError(
                f"checkpoint {step} in {self.directory} could not be restored ({type(e).__name__}: {e}). "
                f"It is corrupt or was written by a different model/optimiser config: delete "
                f"{os.path.join(self.directory, str(step))} to fall back to an older checkpoint, or use a "
                f"fresh --workdir") from None
        return out.state, dict(out.data), step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_like(state: TrainState, sharding: Any) -> TrainState:
    """ShapeDtypeStructs with ``sharding`` for a restore target."""
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), state)
