"""Training: sharding invariance, exact resume after SIGKILL, NaN handling, bad configs, learning."""
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "tests", "train_driver.py")
TINY_DIGITS = ["model.kwargs.nf=8", "model.kwargs.ch_mult=[1]", "model.kwargs.num_res_blocks=1",
               "model.kwargs.attn_resolutions=[]", "training.batch_size=32"]


def _driver(config, workdir, out, overrides, devices=1, background=False, data_dir=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
    if data_dir:
        env["TFDS_DATA_DIR"] = data_dir
    cmd = [sys.executable, DRIVER, os.path.join(ROOT, "configs", config), str(workdir), str(out)] + overrides
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
    assert proc.returncode != 0 and "not divisible by the 8 devices" in proc.stdout + proc.stderr


def test_resume_after_sigkill_is_bitwise_exact(tmp_path):
    data_dir = str(tmp_path / "tfds")
    overrides = TINY_DIGITS + ["training.num_steps=120", "training.ckpt_every=10", "training.log_every=10"]
    full = _driver("digits_cld.py", tmp_path / "full", tmp_path / "full.npz", overrides, data_dir=data_dir)
    assert full.returncode == 0, full.stdout + full.stderr

    proc = _driver("digits_cld.py", tmp_path / "killed", tmp_path / "unused.npz", overrides,
                   background=True, data_dir=data_dir)
    ckdir = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckdir.exists() and any(p.name.isdigit() and int(p.name) >= 20 for p in ckdir.iterdir()):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    latest = Checkpointer(str(tmp_path / "killed"), async_save=False).latest_step()
    assert latest is not None and 20 <= latest < 120

    resumed = _driver("digits_cld.py", tmp_path / "killed", tmp_path / "resumed.npz", overrides,
                      data_dir=data_dir)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from step" in resumed.stdout + resumed.stderr
    a, b = np.load(tmp_path / "full.npz"), np.load(tmp_path / "resumed.npz")
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        assert np.array_equal(a[k], b[k]), f"{k} differs after resume"
    assert json.loads(bytes(a["__data__"]))["next_index"] > 0      # the grain order was restored too


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
])
def test_bad_config_names_the_fix(tmp_path, field, value, match):
    c = _toy(**{field.replace(".", "__"): value})
    with pytest.raises(ValueError, match=match):
        train(c, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


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
             training__log_every=2, training__sample_every=4, training__batch_size=64)
    c.sampling.nfe = 5
    out = train(c, str(tmp_path))
    assert int(out["state"].step) == 4
    losses = _losses(tmp_path)
    assert len(losses) == 2 and np.all(np.isfinite(losses))
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
