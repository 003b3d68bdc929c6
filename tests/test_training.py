"""Training: sharding invariance, NaN handling, bad configs, n_steps_per_call, SIGTERM, checkpoint safety,
learning. (Multi-process runs, SIGKILL and multi-host preemption: tests/test_multihost.py.)"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from diffusion_jax.training import configs
from diffusion_jax.evaluation.distances import sliced_wasserstein
from diffusion_jax.evaluation.distances import gaussian_fit_samples
from diffusion_jax.data import load_split
from diffusion_jax.training import load_run, sample_data, train
from diffusion_jax.training.checkpoint import Checkpointer
from xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "tests", "train_driver.py")
TINY_DIGITS = ["model.kwargs.nf=8", "model.kwargs.ch_mult=[1]", "model.kwargs.num_res_blocks=1",
               "model.kwargs.attn_resolutions=[]", "training.batch_size=32"]


def _driver(config, workdir, out, overrides, devices=1, background=False, data_dir=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env["XLA_FLAGS"] = xla_flags(devices)
    if data_dir:
        env["TFDS_DATA_DIR"] = data_dir
    # TensorBoard off: TensorFlow's import adds ~4 s per process (the summaries have their own test below)
    cmd = [sys.executable, DRIVER, os.path.join(ROOT, "configs", config), str(workdir), str(out),
           "training.tensorboard=false"] + overrides
    if background:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return proc


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.csv")) as f:
        return np.array([float(line.split(",")[1]) for line in f.readlines()[1:]])


def test_same_result_on_8_devices_and_on_1(tmp_path):
    overrides = ["training.num_steps=6", "training.batch_size=64", "training.log_every=1",
                 "training.ckpt_every=6", "model.kwargs.hidden=64"]
    runs = {}
    for n in (1, 8):
        proc = _driver("toy2d_cld.py", tmp_path / f"d{n}", tmp_path / f"d{n}.npz", overrides, devices=n)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        runs[n] = np.load(tmp_path / f"d{n}.npz")
    assert int(runs[8]["__devices__"]) == 8 and int(runs[1]["__devices__"]) == 1
    np.testing.assert_allclose(_losses(tmp_path / "d8"), _losses(tmp_path / "d1"), rtol=1e-5)
    keys = [k for k in runs[1].files if not k.startswith("__")]
    assert any("params" in k for k in keys) and any("ema" in k for k in keys)
    for k in keys:
        np.testing.assert_allclose(runs[8][k], runs[1][k], rtol=2e-5, atol=2e-6, err_msg=k)
    # The batch must split evenly over the devices, and the error says how to fix it.
    proc = _driver("toy2d_cld.py", tmp_path / "bad", tmp_path / "bad.npz",
                   ["training.batch_size=60", "training.num_steps=2"], devices=8)
    assert proc.returncode != 0
    line = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "ConfigError" in ln][-1]
    assert "config.training.batch_size=60 is not divisible by the 8 devices" in line
    assert not (tmp_path / "bad").exists()                          # nothing written to the workdir


def _toy(name="toy2d_vp.py", **over):
    import importlib.util
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, "configs", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.model.kwargs.hidden = 64
    for key, value in over.items():
        node = c
        parts = key.split("__")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = value
    return c


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    c = _toy(training__num_steps=40, training__ckpt_every=10, training__log_every=5, training__batch_size=64)
    train(c, str(tmp_path), stop_after=20)
    good = Checkpointer(str(tmp_path), async_save=False)
    assert good.latest_step() == 20
    _, state_before = load_run(str(tmp_path), c)
    bad = _toy(training__num_steps=40, training__ckpt_every=10, training__log_every=5, training__batch_size=64,
               optim__lr=1e30)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        train(bad, str(tmp_path))
    assert Checkpointer(str(tmp_path), async_save=False).latest_step() == 20
    _, state_after = load_run(str(tmp_path), c)
    for x, y in zip(jax.tree_util.tree_leaves(state_before.params), jax.tree_util.tree_leaves(state_after.params)):
        assert np.array_equal(np.asarray(x), np.asarray(y)) and np.all(np.isfinite(np.asarray(x)))


@pytest.mark.parametrize("field,value,match", [
    ("family.name", "cdld", "unknown family 'cdld'"),
    ("model.name", "unet9", "unknown model 'unet9'"),
    ("data.dataset", "mnist", "unknown dataset 'mnist'"),
    ("data.toy_name", "moons", "unknown toy set 'moons'"),
    ("training.objective", "sm", "unknown training objective"),
    ("optim.optimizer", "sgd", "config.optim.optimizer"),
    ("sampling.method", "ddim", r"unknown sampling method 'ddim' \(config.sampling.method\)"),
    ("sampling.method", "dopri5", "config.sampling.method='dopri5' is adaptive"),
    ("sampling.nfe", 0, "config.sampling.nfe must be an integer >= 1, got 0"),
    ("sampling.order", 4, "config.sampling.order .* 0..3, got 4"),
    ("sampling.grid", "cosine", r"unknown time grid 'cosine' \(config.sampling.grid\)"),
    ("training.n_steps_per_call", 3, "config.training.num_steps=40 is not a multiple of "
                                     "config.training.n_steps_per_call=3"),
    ("training.sample_every", -1, "config.training.sample_every must be"),
    ("mesh.data", 0, "config.mesh.data must be -1"),
])
def test_bad_config_names_the_field_before_any_compile_or_write(tmp_path, field, value, match):
    from diffusion_jax.training.configs import ConfigError
    over = dict(training__num_steps=40, training__sample_every=8)
    over[field.replace(".", "__")] = value
    c = _toy(**over)
    compiles = []

    def listener(event, duration, **kw):
        if "compile" in event:
            compiles.append(event)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        with pytest.raises(ConfigError, match=match) as info:
            train(c, str(tmp_path / "run"))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert "\n" not in str(info.value)                              # one line
    assert compiles == [] and not (tmp_path / "run").exists()


def test_n_steps_per_call_is_bitwise_equal_to_single_steps(tmp_path):
    states = {}
    for k in (1, 4):
        c = _toy("toy2d_cld.py", training__num_steps=8, training__ckpt_every=8, training__log_every=4,
                 training__batch_size=64, training__n_steps_per_call=k)
        out = train(c, str(tmp_path / f"k{k}"))
        assert int(out["state"].step) == 8 and out["iterator_state"] == {"step": 8}
        states[k] = jax.tree_util.tree_leaves(jax.device_get(out["state"]))
    assert all(np.array_equal(a, b) for a, b in zip(states[1], states[4]))
    np.testing.assert_array_equal(_losses(tmp_path / "k1"), _losses(tmp_path / "k4"))


@pytest.mark.parametrize("model", ["ddpmpp", "ncsnpp"])
def test_n_steps_per_call_is_bitwise_equal_to_single_steps_for_the_unets(model):
    """The tiny digits U-Nets (attention, FIR up/down convolutions for NCSN++): one call of k = 4
    (``lax.scan``) leaves params, optimiser state and EMA bitwise equal to 4 single-step calls, and the
    per-step losses agree. Needs models/conv.py's canonical-form kernel gradient on CPU."""
    from diffusion_jax.data import data_shape
    from diffusion_jax.training.setup import build_experiment, make_mesh, shardings, state_initializer
    from diffusion_jax.training.step import batch_sharding_for, jit_train_step
    c = configs.digits("cld")
    c.training.batch_size = 16
    if model == "ddpmpp":
        c.model.kwargs = dict(nf=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    else:
        c.model.name = "ncsnpp"
        c.model.kwargs = dict(nf=8, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                              fir=True, progressive="output_skip", progressive_input="residual")
    mesh = make_mesh(c)
    exp = build_experiment(c, data_shape(c))
    replicated, _ = shardings(mesh)
    batches = np.random.default_rng(0).standard_normal((4, 16) + data_shape(c)).astype(np.float32)
    single = jit_train_step(exp, mesh, n_steps_per_call=1)
    state, losses = state_initializer(exp, replicated)(), []
    for b in batches:
        state, m = single(state, jax.device_put(b, batch_sharding_for(mesh, 1)))
        losses.append(float(m["loss"]))
    four, m4 = jit_train_step(exp, mesh, n_steps_per_call=4)(state_initializer(exp, replicated)(),
                                                             jax.device_put(batches, batch_sharding_for(mesh, 4)))
    assert int(four.step) == int(state.step) == 4
    leaves1 = jax.tree_util.tree_leaves(jax.device_get(state))
    leaves4 = jax.tree_util.tree_leaves(jax.device_get(four))
    unequal = [i for i, (a, b) in enumerate(zip(leaves1, leaves4)) if not np.array_equal(a, b)]
    assert unequal == [], f"{len(unequal)} of {len(leaves1)} state leaves differ"
    np.testing.assert_array_equal(np.asarray(m4["loss"]), np.asarray(losses, np.float32))


def test_sigterm_saves_at_the_next_step_and_resumes_exactly(tmp_path):
    """Single process: SIGTERM -> checkpoint at the next step boundary, return normally; the resume
    equals an uninterrupted run. (Several processes: tests/test_multihost.py.)"""
    import threading
    kw = dict(training__num_steps=400, training__ckpt_every=100, training__log_every=100,
              training__batch_size=32, model__kwargs__hidden=16)
    full = train(_toy("toy2d_cld.py", **kw), str(tmp_path / "full"))
    work = tmp_path / "run"
    ckdir = work / "checkpoints"

    def watch():            # SIGTERM as soon as the first checkpoint exists (mid-run)
        deadline = time.time() + 120
        while time.time() < deadline:
            if ckdir.exists() and any(p.name.isdigit() for p in ckdir.iterdir()):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    part = train(_toy("toy2d_cld.py", **kw), str(work))
    watcher.join()
    assert part["preempted"] and 100 <= part["step"] < 400, part["step"]
    assert Checkpointer(str(work), async_save=False).latest_step() == part["step"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL       # handler restored
    rest = train(_toy("toy2d_cld.py", **kw), str(work))
    assert rest["start"] == part["step"] and not rest["preempted"]
    for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(full["state"])),
                    jax.tree_util.tree_leaves(jax.device_get(rest["state"]))):
        assert np.array_equal(a, b)


def test_unreadable_newest_checkpoint_falls_back_and_deletes_nothing(tmp_path, capsys):
    from diffusion_jax.training.checkpoint import CheckpointError
    from diffusion_jax.training.setup import abstract_state, make_mesh, shardings
    kw = dict(training__num_steps=8, training__ckpt_every=4, training__log_every=4, training__batch_size=32,
              model__kwargs__hidden=16)
    c = _toy("toy2d_cld.py", **kw)
    train(c, str(tmp_path))
    _, good = load_run(str(tmp_path), step=4)
    state_files = [p for p in (tmp_path / "checkpoints" / "8" / "state").rglob("*") if p.is_file()]
    data_files = [p for p in state_files if p.stat().st_size > 0 and "/d/" in str(p)]
    assert data_files
    for p in data_files:                       # truncate the array data of the newest checkpoint
        with open(p, "r+b") as f:
            f.truncate(p.stat().st_size // 2)
    n_files = sum(1 for p in tmp_path.rglob("*") if p.is_file())
    n_step8 = sum(1 for p in (tmp_path / "checkpoints" / "8").rglob("*") if p.is_file())
    # An explicit step: the error names step, directory and cause (chained); nothing changes.
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    exp, _ = load_run(str(tmp_path), step=4)
    target = abstract_state(exp, shardings(make_mesh(c))[0])
    with pytest.raises(CheckpointError, match=r"checkpoint step 8 in .*checkpoints could not be restored") as info:
        ckpt.restore(target, step=8)
    ckpt.close()
    assert info.value.__cause__ is not None and "delete" not in str(info.value)
    assert sum(1 for p in tmp_path.rglob("*") if p.is_file()) == n_files
    # An interrupted write newer than everything (orbax's temporary directory) is reported and skipped.
    (tmp_path / "checkpoints" / "12.orbax-checkpoint-tmp-1").mkdir()
    # Resuming: falls back to step 4 with a message naming step 8 and the cause; step 8 is moved aside.
    capsys.readouterr()
    out = train(_toy("toy2d_cld.py", **kw), str(tmp_path))
    text = capsys.readouterr().out
    assert "12.orbax-checkpoint-tmp-1" in text and "interrupted write" in text
    assert "checkpoint step 8 in" in text and "could not be restored (" in text and "resuming from step 4" in text
    assert out["start"] == 4 and int(out["state"].step) == 8
    moved = tmp_path / "checkpoints_unreadable" / "8"
    assert moved.is_dir() and sum(1 for p in moved.rglob("*") if p.is_file()) == n_step8
    assert (tmp_path / "checkpoints" / "12.orbax-checkpoint-tmp-1").is_dir()
    assert sum(1 for p in tmp_path.rglob("*") if p.is_file()) >= n_files       # nothing deleted
    # The previous checkpoint restored exactly.
    _, again = load_run(str(tmp_path), step=4)
    for a, b in zip(jax.tree_util.tree_leaves(good), jax.tree_util.tree_leaves(again)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_load_run_uses_the_config_in_the_checkpoint(tmp_path):
    c = _toy("toy2d_cld.py", training__num_steps=4, training__ckpt_every=4, training__log_every=4,
             training__batch_size=32, model__kwargs__hidden=24)
    out = train(c, str(tmp_path))
    other = _toy("toy2d_cld.py", model__kwargs__hidden=48)          # a later run rewrote config.json
    (tmp_path / "config.json").write_text(other.to_json_best_effort())
    exp, state = load_run(str(tmp_path))
    assert exp.config.model.kwargs.hidden == 24 and exp.config.model.kwargs == c.model.kwargs
    for a, b in zip(jax.tree_util.tree_leaves(out["state"].params), jax.tree_util.tree_leaves(state.params)):
        assert np.array_equal(np.asarray(a), np.asarray(b))

    # a run written before training.tensorboard existed: its saved config lacks the field
    meta = tmp_path / "checkpoints" / "4" / "config" / "metadata"
    saved = json.loads(meta.read_text())
    del saved["training"]["tensorboard"]
    meta.write_text(json.dumps(saved))
    exp, _ = load_run(str(tmp_path))
    assert exp.config.training.tensorboard is True
    assert json.loads(exp.config.to_json_best_effort()) == json.loads(c.to_json_best_effort())


def test_tensorboard_summaries_match_metrics_csv_and_can_be_switched_off(tmp_path):
    import tensorflow as tf
    kw = dict(training__num_steps=4, training__ckpt_every=4, training__log_every=2, training__batch_size=32,
              model__kwargs__hidden=24)
    train(_toy("toy2d_cld.py", **kw), str(tmp_path / "on"))
    events = [f for f in os.listdir(tmp_path / "on") if f.startswith("events.out.tfevents")]
    assert len(events) == 1, os.listdir(tmp_path / "on")
    seen = {}
    for event in tf.compat.v1.train.summary_iterator(str(tmp_path / "on" / events[0])):
        for v in event.summary.value:
            seen[(v.tag, event.step)] = float(tf.make_ndarray(v.tensor))
    with open(tmp_path / "on" / "metrics.csv") as f:
        rows = [line.strip().split(",") for line in f.readlines()[1:]]
    assert [int(r[0]) for r in rows] == [2, 4]
    for step, loss, gnorm, rate in rows:
        for tag, value in (("loss", loss), ("grad_norm", gnorm), ("steps_per_s", rate)):
            np.testing.assert_allclose(seen[(tag, int(step))], float(value), rtol=1e-3, err_msg=tag)

    train(_toy("toy2d_cld.py", training__tensorboard=False, **kw), str(tmp_path / "off"))
    assert not [f for f in os.listdir(tmp_path / "off") if f.startswith("events")]
    assert _losses(tmp_path / "off").shape == (2,)


def test_missing_dataset_names_the_directory(tmp_path):
    c = configs.cifar10("vp")
    c.data.data_dir = str(tmp_path / "no_tfds_here")
    with pytest.raises(FileNotFoundError, match="no_tfds_here"):
        train(c, str(tmp_path / "run"))


def test_digits_builder_prepares_offline(tmp_path):
    c = configs.digits("cld")
    c.data.data_dir = str(tmp_path)
    train_x, test_x = load_split(c, "train"), load_split(c, "test")
    assert train_x.shape == (1500, 8, 8, 1) and test_x.shape == (297, 8, 8, 1)
    from sklearn.datasets import load_digits
    ref = load_digits().images.astype(np.float32) / 8.0 - 1.0
    # Same multiset of images as scikit-learn's copy (tfds orders records by a hash of their keys).
    key = lambda a: np.sort(a.reshape(len(a), -1).sum(1))
    np.testing.assert_allclose(key(np.concatenate([train_x, test_x])), key(ref), atol=1e-5)
    assert train_x.min() == -1.0 and train_x.max() == 1.0


@pytest.mark.parametrize("config", ["toy2d_vp.py", "toy2d_cld.py"])
def test_toy_training_learns_the_ring(tmp_path, config):
    """Trained on 8 Gaussians, samples are far closer to the data than a Gaussian fit of the data is."""
    c = _toy(config, data__toy_name="ring8", training__num_steps=1000, training__ckpt_every=1000,
             training__batch_size=256, model__kwargs__hidden=128)
    out = train(c, str(tmp_path))
    data = load_split(c, "test", limit=1000)
    key = jax.random.PRNGKey(3)
    x_trained = sample_data(out["experiment"], out["state"].ema["0.999"], key, 1000, "gddim", 50)
    other = load_split(c, "test", limit=2000)[1000:]
    x_gauss = gaussian_fit_samples(other, 1000)
    sw_trained, sw_gauss = sliced_wasserstein(x_trained, data), sliced_wasserstein(x_gauss, data)
    floor = sliced_wasserstein(other, data)
    assert sw_trained < 0.5 * sw_gauss and sw_trained < 4 * floor + 0.05, (sw_trained, sw_gauss, floor)


def test_bfloat16_compute_and_periodic_samples(tmp_path):
    """model.dtype='bfloat16': the network's matmuls in the jitted training step (forward and backward) run on
    bfloat16 operands, parameters stay float32, and the trained network's output differs from the same
    network in float32 by bfloat16 rounding (far above float32 rounding)."""
    import dataclasses
    import jax.numpy as jnp
    from test_models import matmul_dtypes
    from diffusion_jax.training.state import create_state
    from diffusion_jax.training.step import train_step_fn

    c = _toy("toy2d_cld.py", model__dtype="bfloat16", training__num_steps=4, training__ckpt_every=4,
             training__log_every=2, training__sample_every=2, training__batch_size=64)
    c.sampling.nfe = 5
    c.sampling.order = 2
    c.sampling.grid = "quadratic"
    traces = []
    import diffusion_jax.samplers as samplers_module
    from diffusion_jax.compilation import CompileLog
    real_compile = samplers_module.compile

    def counting_compile(*args, **kwargs):      # the periodic sampler is built (and compiled) once
        traces.append((kwargs.get("order"), kwargs.get("grid")))
        return real_compile(*args, **kwargs)
    samplers_module.compile = counting_compile
    try:
        with CompileLog() as log:
            out = train(c, str(tmp_path))
    finally:
        samplers_module.compile = real_compile
    assert traces == [(2, "quadratic")] and log.count("sampler_") == 1, (traces, log.compiled)
    out = train(c, str(tmp_path))
    assert int(out["state"].step) == 4
    losses = _losses(tmp_path)
    assert len(losses) == 2 and np.all(np.isfinite(losses))
    assert (tmp_path / "samples" / "step_00000002.png").exists()
    assert (tmp_path / "samples" / "step_00000004.png").exists()
    leaves = jax.tree_util.tree_leaves(out["state"].params)
    assert all(leaf.dtype == np.float32 for leaf in leaves)        # bf16 compute, float32 parameters
    exp, params = out["experiment"], out["state"].params
    # The step's matmuls: one per Dense layer forward, and its kernel gradient backward, all in bfloat16
    # (the float32 ones are the family's k x k matrices in the loss and preconditioning).
    n_dense = sum(1 for path, _ in jax.tree_util.tree_leaves_with_path(params) if "kernel" in str(path[-1]))
    state = create_state(params, exp.tx, c.ema_rates, c.seed)
    ops = matmul_dtypes(train_step_fn(exp), state, jnp.zeros((64, 2), jnp.float32))
    assert ops.count("bfloat16/bfloat16") >= 2 * n_dense >= 2 * 6, (n_dense, ops)
    # Same trained parameters, float32 compute: relative output change of bfloat16 size.
    shape = exp.precond.to_network(jnp.zeros((256,) + exp.data_shape + (exp.sde.order,))).shape
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    t = jnp.linspace(0.0, 999.0, 256)
    net32 = dataclasses.replace(exp.net, dtype=jnp.float32)
    y16 = exp.net.apply({"params": params}, x, t)
    y32 = net32.apply({"params": params}, x, t)
    rel = float(jnp.linalg.norm(y16 - y32) / jnp.linalg.norm(y32))
    print(f"bf16 step: {ops.count('bfloat16/bfloat16')} bf16 matmuls ({n_dense} Dense layers), output rel. change {rel:.2e}")
    assert y16.dtype == jnp.float32 and 1e-3 < rel < 0.1, rel


def test_periodic_sampling_compiles_once(tmp_path):
    """Three periodic samples during training (new EMA parameters each time): one compiled sampler."""
    from diffusion_jax.compilation import CompileLog
    c = _toy("toy2d_cld.py", training__num_steps=6, training__ckpt_every=6, training__log_every=2,
             training__sample_every=2, training__batch_size=64)
    c.sampling.nfe = 5
    c.sampling.num_samples = 16
    with CompileLog() as log:
        train(c, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "samples")) == [f"step_0000000{i}.png" for i in (2, 4, 6)]
    assert log.count("sampler_") == 1, log.compiled
