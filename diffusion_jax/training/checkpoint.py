"""Checkpoints with orbax: train state (params, optimiser, EMA, rng, step), data-iterator state, config.

Saving is asynchronous (the step loop goes on while the arrays are written) and atomic (orbax writes
to a temporary directory and renames it when complete), so a run killed mid-save leaves the previous
complete checkpoint as the latest; ``keep`` bounds how many are kept. Items of step ``n`` under
``<workdir>/checkpoints/<n>/``: ``state`` (the sharded train state; every process writes its shards),
``data`` (grain's handler: one ``process_<i>-of-<P>.json`` iterator state per process) and ``config``
(the run's config as JSON, read back by :func:`diffusion_jax.training.load_run`).

Restoring never deletes anything. An interrupted write (a ``<n>.orbax-checkpoint-tmp-*`` directory
newer than the latest complete step) is reported and skipped. A complete-looking step that cannot be
read (truncated or corrupted files) is skipped for the newest older step that can be read; the message
names its step, directory and cause, and it is moved aside to ``<workdir>/checkpoints_unreadable/<n>``
(so a later save of step n does not collide with it; it can be inspected or moved back). When no
step can be read nothing is moved and the error (chained to the newest cause) names step and directory.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from diffusion_jax.training.state import TrainState

_TMP = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")
# orbax's replica-parallel save splits every replicated array into one slice per replica, each with its own
# device-to-host copy and write. For a small model that per-slice overhead dominates: a 374-leaf tiny U-Net state
# replicated on 8 CPU devices took 4.0 s for the first save and 1.0 s for later ones, 0.6 s / 0.4 s with one writer
# per array. Arrays are therefore split only when each slice would hold at least this many bytes (the large
# kernels of a paper-sized network still are).
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """The handler of the ``state`` item: the standard on-disk format (OCDBT), with the slice bound above."""
    registry = ocp.type_handlers.create_type_handler_registry(
        (jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES)))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


class CheckpointError(RuntimeError):
    """A checkpoint could not be restored (the message names step, directory and cause)."""


def _agree(ok: bool) -> bool:
    """True only if ``ok`` holds on every process."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils
    return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True,
                 log: Callable[[str], None] = print):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        self.log = log
        import grain
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        handlers = dict(state=_state_handler(), data=grain.checkpoint.CheckpointHandler(),
                        config=ocp.JsonCheckpointHandler())
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, state: TrainState, data: Any, config_json: str) -> bool:
        """Save at ``state.step`` (``data``: a :class:`diffusion_jax.data.Checkpointable`, or None for a run
        with no data iterator, e.g. an imported checkpoint); False if that step is already saved."""
        import grain
        step = int(jax.device_get(state.step))
        if self.latest_step() == step:
            return False
        items = dict(state=ocp.args.PyTreeSave(state), config=ocp.args.JsonSave(json.loads(config_json)))
        if data is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data)
        self.manager.save(step, force=True, args=ocp.args.Composite(**items))
        return True

    def incomplete_steps(self) -> list[str]:
        """Interrupted writes (orbax temporary directories) newer than the latest complete step."""
        if not os.path.isdir(self.directory):
            return []
        latest = self.latest_step()
        out = []
        for name in sorted(os.listdir(self.directory)):
            m = _TMP.match(name)
            if m and (latest is None or int(m.group(1)) > latest):
                out.append(name)
        return out

    def _move_aside(self, step: int) -> str:
        """Move an unreadable step out of orbax's directory (process 0); returns the new path."""
        target_root = os.path.join(self.workdir, "checkpoints_unreadable")
        target = os.path.join(target_root, str(step))
        if jax.process_index() == 0:
            os.makedirs(target_root, exist_ok=True)
            i = 1
            while os.path.exists(target):
                target = os.path.join(target_root, f"{step}.{i}")
                i += 1
            shutil.move(os.path.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"diffusion_jax moved checkpoint {step} aside")
        self.manager.reload()
        return target

    def restore_config(self, step: int | None = None) -> tuple[dict, int]:
        """(the config dict saved with ``step`` (default: latest), step)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        except Exception as e:
            raise CheckpointError(f"the config of checkpoint step {step} in {self.directory} could not be "
                                  f"read: {type(e).__name__}: {e}") from e
        return dict(out.config), step

    def restore(self, abstract_state: TrainState, data: Any = None, step: int | None = None
                ) -> tuple[TrainState, int]:
        """(state, step) of ``step``, or of the newest checkpoint that can be read (``data``: a
        :class:`diffusion_jax.data.Checkpointable` whose state is restored in place)."""
        import grain
        for name in self.incomplete_steps():
            self.log(f"checkpoint {name} in {self.directory} is an interrupted write (incomplete): skipped, "
                     f"resuming from the newest complete checkpoint (step {self.latest_step()})")
        steps = [step] if step is not None else self.all_steps()[::-1]
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        failed: list[tuple[int, BaseException, str]] = []
        for s in steps:
            items = dict(state=ocp.args.PyTreeRestore(
                abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)))
            if data is not None:
                items["data"] = grain.checkpoint.CheckpointRestore(data)
            error = None
            try:
                out = self.manager.restore(s, args=ocp.args.Composite(**items))
            except Exception as e:              # orbax/tensorstore raise many types
                error = e
            if _agree(error is None):
                for bad, _, cause in failed:    # only now: a good older step exists
                    moved = self._move_aside(bad)
                    self.log(f"checkpoint step {bad} in {self.directory} could not be restored ({cause}); "
                             f"moved it to {moved} (nothing deleted); resuming from step {s}")
                return out.state, s
            error = error if error is not None else RuntimeError("restore failed on another process")
            failed.append((s, error, " ".join(f"{type(error).__name__}: {error}".split())[:500]))
        s, e, cause = failed[0]
        raise CheckpointError(
            f"checkpoint step {s} in {self.directory} could not be restored ({cause})"
            + (f"; no older step could be read either ({', '.join(str(t) for t, _, _ in failed[1:])})"
               if len(failed) > 1 else "")
            + ". Nothing was changed. If the model, optimiser or data config changed since it was written, "
              "restore with the config stored in the checkpoint (load_run does) or train in a new --workdir"
        ) from e

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
