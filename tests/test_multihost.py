"""Multi-process training, as on a pod: 2 processes x 4 CPU devices (jax.distributed on 127.0.0.1).

One scenario (start-up compiles dominate, so the runs share a persistent compilation cache):

1. an uninterrupted 2 x 4 run of the digits CLD config (tiny U-Net, periodic sampling firing) equals a
   1 x 8 run (float tolerance: the cross-process all-reduce sums in another order); only process 0
   wrote the shared files (config.json, metrics.csv, sample PNGs), seen by Python audit hooks;
2. the same job SIGKILLed (both processes) after a checkpoint, restarted, then SIGTERMed (process 0
   only: jax's preemption sync tells process 1): both save at the same step and exit 0; restarted
   again it finishes bitwise equal to the uninterrupted 2 x 4 run.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "tests", "train_driver.py")
CONFIG = os.path.join(ROOT, "configs", "digits_cld.py")
STEPS = 24
OVERRIDES = ["model.kwargs.nf=8", "model.kwargs.ch_mult=[1]", "model.kwargs.num_res_blocks=1",
             "model.kwargs.attn_resolutions=[]", "training.batch_size=32", f"training.num_steps={STEPS}",
             "training.log_every=4", "training.ckpt_every=4", "training.sample_every=8", "sampling.nfe=4",
             "sampling.num_samples=8", "training.tensorboard=false"]      # no TensorFlow import (~4 s each)
TIMEOUT = 300          # seconds per run (start-up compiles included)
# The uninterrupted reference runs checkpoint only at the end (fewer saves): the resumed run, checkpointed every
# 4 steps, must still equal them bit for bit.
REF_OVERRIDES = OVERRIDES + [f"training.ckpt_every={STEPS}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, data_dir: str, cache: str) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, TFDS_DATA_DIR=data_dir,
                XLA_FLAGS=xla_flags(devices),
                JAX_COMPILATION_CACHE_DIR=cache)


def _start_pair(tmp, name: str, workdir, data_dir: str, cache: str, audit: bool = False, overrides=OVERRIDES):
    port = _free_port()
    procs = []
    for pid in range(2):
        cmd = [sys.executable, DRIVER, CONFIG, str(workdir), str(tmp / f"{name}.npz")] + overrides + [
            "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(pid)]
        if audit:
            cmd += ["--audit-writes", str(tmp / f"{name}.writes{pid}.json")]
        log = open(tmp / f"{name}.p{pid}.log", "w")
        procs.append(subprocess.Popen(cmd, env=_env(4, data_dir, cache), stdout=log, stderr=subprocess.STDOUT))
        log.close()
    return procs


def _log(tmp, name: str, pid: int) -> str:
    return (tmp / f"{name}.p{pid}.log").read_text()


def _wait(procs, tmp, name: str) -> None:
    deadline = time.time() + TIMEOUT
    for p in procs:
        p.wait(timeout=max(deadline - time.time(), 1))
    for pid, p in enumerate(procs):
        assert p.returncode == 0, f"process {pid} exited {p.returncode}:\n" + _log(tmp, name, pid)[-3000:]


def _kill(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _steps(workdir) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _wait_for_checkpoint(procs, workdir, after: int) -> int:
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        newer = [s for s in _steps(workdir) if s > after]
        if newer:
            return newer[0]
        assert all(p.poll() is None for p in procs), "a process ended before the checkpoint appeared"
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint after step {after} within {TIMEOUT} s")


def _leaves(path) -> dict:
    z = np.load(path)
    return {k: z[k] for k in z.files}


def test_two_processes_equal_one_and_survive_kill_and_preemption(tmp_path):
    from diffusion_jax.data import digits
    data_dir, cache = str(tmp_path / "tfds"), str(tmp_path / "jax_cache")
    digits.prepare(data_dir)                       # once, before the processes start
    procs = []
    try:
        # 1. uninterrupted 2 x 4, with write audit, and 1 x 8.
        procs = _start_pair(tmp_path, "ref2", tmp_path / "ref2", data_dir, cache, audit=True,
                            overrides=REF_OVERRIDES)
        _wait(procs, tmp_path, "ref2")
        one = subprocess.run([sys.executable, DRIVER, CONFIG, str(tmp_path / "ref8"), str(tmp_path / "ref8.npz")]
                             + REF_OVERRIDES, env=_env(8, data_dir, cache), capture_output=True, text=True,
                             timeout=TIMEOUT)
        assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
        ref2, ref8 = _leaves(tmp_path / "ref2.npz"), _leaves(tmp_path / "ref8.npz")
        assert int(ref2["__processes__"]) == 2 and int(ref8["__processes__"]) == 1
        assert int(ref2["__devices__"]) == int(ref8["__devices__"]) == 8
        assert int(ref2["__step__"]) == STEPS
        keys = [k for k in ref2 if not k.startswith("__")]
        assert any("params" in k for k in keys) and any("ema" in k for k in keys) and any("opt" in k for k in keys)
        for k in keys:
            np.testing.assert_allclose(ref2[k], ref8[k], rtol=1e-5, atol=1e-6, err_msg=k)
        assert bytes(ref2["__data__"]) == bytes(ref8["__data__"])            # same data position
        with open(tmp_path / "ref2" / "metrics.csv") as f:
            rows = f.read().splitlines()
        assert [r.split(",")[0] for r in rows[1:]] == [str(s) for s in range(4, STEPS + 1, 4)]
        writes = [json.loads((tmp_path / f"ref2.writes{pid}.json").read_text()) for pid in range(2)]
        shared = {"config.json", "metrics.csv"} | {f"samples/step_{s:08d}.png" for s in range(8, STEPS + 1, 8)}
        assert shared <= set(writes[0]), writes[0]
        assert writes[1] and all(w.startswith("checkpoints") for w in writes[1]), writes[1]
        assert "samples at step 8" in _log(tmp_path, "ref2", 0)
        assert "[process 1/2]" in _log(tmp_path, "ref2", 1)                 # process 1 logs to its own stream

        # 2. SIGKILL both after a checkpoint; restart; SIGTERM process 0; restart to the end.
        work = tmp_path / "run"
        procs = _start_pair(tmp_path, "killed", work, data_dir, cache)
        first = _wait_for_checkpoint(procs, work, 0)
        for p in procs:
            p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait()
        assert all(p.returncode == -signal.SIGKILL for p in procs)
        killed_at = max(_steps(work))
        assert first <= killed_at < STEPS

        procs = _start_pair(tmp_path, "preempted", work, data_dir, cache)
        seen = _wait_for_checkpoint(procs, work, killed_at)
        procs[0].send_signal(signal.SIGTERM)
        _wait(procs, tmp_path, "preempted")                                   # both exit 0
        logs = [_log(tmp_path, "preempted", pid) for pid in range(2)]
        assert all(f"resumed from step {killed_at}" in log for log in logs)
        saved = [int(log.split("checkpoint saved at step ")[1].split()[0]) for log in logs]
        assert saved[0] == saved[1] and seen <= saved[0] < STEPS, saved      # one agreed step, not the end
        assert max(_steps(work)) == saved[0]

        procs = _start_pair(tmp_path, "resumed", work, data_dir, cache)
        _wait(procs, tmp_path, "resumed")
        assert f"resumed from step {saved[0]}" in _log(tmp_path, "resumed", 0)
        resumed = _leaves(tmp_path / "resumed.npz")
        assert sorted(resumed) == sorted(ref2)
        for k in ref2:
            if k != "__preempted__":
                assert np.array_equal(resumed[k], ref2[k]), f"{k} differs after kill + preemption + resume"
    finally:
        _kill(procs)
