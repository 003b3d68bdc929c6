"""The trained-run report (diffusion_jax.analysis.report) against independent recomputations.

* a tiny CLD model trained here on ring8: files, finite numbers, and the chord deviation, the sampling
  distance, the region split and the nearest-neighbour distances recomputed in numpy from the saved arrays
  and an independently rebuilt training set;
* a "learned" model that is the optimal denoiser plus a known constant c (TOLD, k = 3): the learned- and
  optimal-path deviations are |c| at every time, and with c = 0 every distance vanishes.
"""
from __future__ import annotations

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import sdes
from diffusion_jax.training import configs
from diffusion_jax.analysis import report
from diffusion_jax.analysis.deviation import empirical_denoiser_fn

N, NFE = 16, 10
DATA_LIMIT, HELDOUT = 512, 256


def _numbers(obj, path=""):
    """Every number in a JSON tree, with its path (None = an undefined value, reported as such)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")
    elif obj is None or (isinstance(obj, (int, float)) and not isinstance(obj, bool)):
        yield path, obj


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from diffusion_jax.training import train
    c = configs.toy2d("cld", toy_name="ring8")
    c.model.kwargs.hidden = 32
    c.model.kwargs.depth = 2
    c.training.update(num_steps=300, batch_size=128, ckpt_every=300, log_every=100, async_checkpoints=False)
    c.optim.warmup = 20
    workdir = str(tmp_path_factory.mktemp("toy_cld"))
    train(c, workdir)
    return c, workdir


def test_report_on_trained_toy_run(trained, tmp_path):
    config, workdir = trained
    out = str(tmp_path / "report")
    # the eps form (order 1, uniform grid): on this 300-step toy CLD model the tuned denoiser default samples
    # far from the ring at NFE 10 (sliced W2 6.3 +- 1.7 vs 1.5 +- 1.3, 3 x 256 samples; the grid, not the form:
    # the denoiser form on the uniform grid gives 0.72 +- 0.07), and the last check below is about the model
    s = report.run(workdir, out, n=N, nfe=NFE, method="gddim", data_limit=DATA_LIMIT, heldout_limit=HELDOUT,
                   predict="eps")

    for name in ("summary.json", "summary.md", "trajectories.npz", "score_deviation.png", "chord_deviation.png",
                 "memorisation.png", "trajectories.png",
                 "projection_learned.png", "projection_optimal.png"):
        path = os.path.join(out, name)
        assert os.path.getsize(path) > 100, name
        if name.endswith(".png"):
            with open(path, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    assert s == json.load(open(os.path.join(out, "summary.json")))
    bad = [p for p, v in _numbers(s) if v is None or not math.isfinite(v)]
    assert not bad, bad
    assert s["run"]["k"] == 2 and s["run"]["step"] == 300 and s["settings"]["nfe_used"]["learned"] == NFE
    assert not any(s["settings"]["diverged"].values())
    md = open(os.path.join(out, "summary.md")).read()
    assert "sigma(t) > sigma_data" in md and "| learned |" in md

    arr = np.load(os.path.join(out, "trajectories.npz"))
    x = arr["x_learned"].astype(np.float64)                                  # (N+1, batch, 2)
    assert x.shape == (s["settings"]["grid_points"], N, 2)
    # chord deviation of the first trajectory, by hand: |(x_i - x_0) - proj onto (x_N - x_0)|
    p = x[:, 0]
    e = (p[-1] - p[0]) / np.linalg.norm(p[-1] - p[0])
    rel = p - p[0]
    dev = np.linalg.norm(rel - np.outer(rel @ e, e), axis=1)
    np.testing.assert_allclose(s["curves"]["first_example_chord_deviation_learned_sampling"], dev,
                               rtol=1e-6, atol=1e-9)
    r, ch = x - x[:1], x[-1] - x[0]                                           # 2-D: |r x chord| / |chord|
    peaks = np.max(np.abs(r[..., 0] * ch[:, 1] - r[..., 1] * ch[:, 0]), axis=0) / np.linalg.norm(ch, axis=-1)
    np.testing.assert_allclose(s["geometry"]["learned"]["sampling"]["max_chord_deviation"], np.mean(peaks),
                               rtol=1e-6)
    # sampling distance per time and its region means under the stated split rule
    samp = np.linalg.norm(x - arr["x_optimal"], axis=-1).mean(axis=1)
    np.testing.assert_allclose(s["curves"]["sampling"], samp, rtol=1e-6, atol=1e-9)
    assert samp[0] == 0.0                                                     # same initial state

    # the training set rebuilt independently: the first batches of the run's own stream
    from diffusion_jax.data.toy import toy_sample
    nb = -(-DATA_LIMIT // config.training.batch_size)
    train_pts = np.concatenate([np.asarray(toy_sample("ring8", jax.random.fold_in(jax.random.PRNGKey(config.seed), i),
                                                      config.training.batch_size)) for i in range(nb)])[:DATA_LIMIT]
    sigma_data = float(np.std(train_pts))
    np.testing.assert_allclose(s["split"]["sigma_data"], sigma_data, rtol=1e-5)
    large = np.asarray(s["curves"]["sigma"]) > sigma_data
    assert large.any() and (~large).any()
    assert s["split"]["n_large"] == int(large.sum())
    np.testing.assert_allclose(s["score_deviation"]["sampling"]["large_noise"], samp[large].mean(), rtol=1e-6)
    np.testing.assert_allclose(s["score_deviation"]["sampling"]["small_noise"], samp[~large].mean(), rtol=1e-6)
    # memorisation: brute-force nearest training point of the final learned samples (denoiser at t_min)
    final = arr["D_learned"][-1].astype(np.float64)
    d1 = np.sqrt(((final[:, None] - train_pts[None]) ** 2).sum(-1)).min(axis=1)
    np.testing.assert_allclose(s["memorisation"]["learned"]["nn_distance_mean"], d1.mean(), rtol=1e-4, atol=1e-6)
    # the optimal sampler's samples are training points; a 300-step model's are not
    assert s["memorisation"]["optimal"]["nn_distance_mean"] < 1e-3
    assert s["memorisation"]["learned"]["nn_distance_mean"] > 10 * s["memorisation"]["optimal"]["nn_distance_mean"]
    # it learned something: samples much closer to the data than the prior's spread
    assert s["sliced_wasserstein_to_heldout"]["learned"] < 0.6


@functools.lru_cache(maxsize=None)
def _told():
    """One TOLD instance for both cases: its gDDIM square-root table is then built once."""
    return sdes.make("told")


@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_optimal_denoiser_plus_constant(tmp_path, shift):
    """Learned = D* + c: learned/optimal-path deviations equal |c| exactly; c = 0 makes every distance ~0."""
    sde = _told()
    rng = np.random.default_rng(0)
    data = rng.normal(size=(48, 2)).astype(np.float32)
    held = rng.normal(size=(32, 2)).astype(np.float32)
    c = jnp.asarray([shift, -shift], jnp.float32)                            # |c| = shift * sqrt(2)
    opt = empirical_denoiser_fn(sde, data)
    s = report.analyze(sde, lambda u, t: opt(u, t) + c, data, held, str(tmp_path), output="denoiser", n=8,
                       nfe=8, method="gddim", plots=False)
    dist = s["curves"]
    norm_c = float(np.linalg.norm(np.asarray(c)))
    for key in ("learned_deviation", "optimal_deviation"):
        np.testing.assert_allclose(dist[key], norm_c, atol=2e-4 + 1e-3 * norm_c, err_msg=key)
    # the denoising distance at t = T (same initial state) is |c| too
    np.testing.assert_allclose(dist["denoising"][0], norm_c, atol=2e-4 + 1e-3 * norm_c)
    if shift == 0.0:
        for key in ("sampling", "denoising", "state_distance"):
            assert np.max(dist[key]) < 1e-4, (key, dist[key])
        assert s["memorisation"]["learned"]["nn_distance_mean"] < 1e-4
    else:
        assert np.max(dist["sampling"]) > 0.05          # a shifted denoiser moves the learned path


def test_report_on_a_tiny_bdm_run(tmp_path):
    """Blurring diffusion (a modal family) end to end through report.run: a tiny MLP trained for 10 steps on
    ring8 with bdm over the 2-point DCT of the toy data. The learned model is poor; what is checked is that
    every part runs on a modal family and that the parts with a known answer hold: the optimal sampler's final
    denoised samples are training points, the same start gives zero sampling distance at T, and the noise split
    uses the unblurred mode's sigma(t) = tan(phi_T t)."""
    from diffusion_jax.training import train
    c = configs.toy2d("bdm", toy_name="ring8", shape=(2,), sigma_blur_max=1.0)
    c.model.kwargs.hidden = 32
    c.model.kwargs.depth = 2
    c.training.update(num_steps=10, batch_size=64, ckpt_every=10, log_every=10, async_checkpoints=False)
    c.optim.warmup = 2
    workdir = str(tmp_path / "run")
    train(c, workdir)
    out = str(tmp_path / "report")
    s = report.run(workdir, out, n=8, nfe=8, method="gddim", data_limit=128, heldout_limit=64, chunk=64)
    for name in ("summary.json", "summary.md", "trajectories.npz", "trajectories.png", "score_deviation.png",
                 "chord_deviation.png", "memorisation.png", "projection_learned.png", "projection_optimal.png"):
        assert os.path.getsize(os.path.join(out, name)) > 100, name
    assert s == json.load(open(os.path.join(out, "summary.json")))
    assert s["run"]["family"] == "bdm" and s["run"]["k"] == 1 and s["run"]["step"] == 10
    bad = [p for p, v in _numbers(s) if v is None or not math.isfinite(v)]
    assert not bad, bad
    assert "unblurred" in s["split"]["rule"] and "unblurred" in open(os.path.join(out, "summary.md")).read()
    phi_t = math.atan(math.exp(5.0))                                        # logsnr_min = -10
    np.testing.assert_allclose(s["curves"]["sigma"], np.tan(phi_t * np.asarray(s["curves"]["t"])), rtol=1e-9)
    assert s["curves"]["sampling"][0] == 0.0
    assert s["memorisation"]["optimal"]["nn_distance_mean"] < 1e-4
    arr = np.load(os.path.join(out, "trajectories.npz"))
    assert arr["x_optimal"].shape == (s["settings"]["grid_points"], 8, 2)


def test_analyze_bdm_images_with_optimal_denoiser_plus_constant(tmp_path):
    """Blurring diffusion on 4x4 images (the image figures), learned = D* + c: the learned- and optimal-path
    deviations are |c| at every time, as for the pixel-shared families."""
    sde = sdes.make("bdm", shape=(4, 4, 1), sigma_blur_max=3.0)
    rng = np.random.default_rng(1)
    data = rng.uniform(-1, 1, size=(40, 4, 4, 1)).astype(np.float32)
    held = rng.uniform(-1, 1, size=(16, 4, 4, 1)).astype(np.float32)
    c = jnp.asarray(0.05 * np.cos(np.arange(16.0)).reshape(4, 4, 1), jnp.float32)
    opt = empirical_denoiser_fn(sde, data, chunk=16)
    s = report.analyze(sde, lambda u, t: opt(u, t) + c, data, held, str(tmp_path), output="denoiser", n=6,
                       nfe=8, method="gddim", chunk=16)
    assert os.path.getsize(os.path.join(str(tmp_path), "samples.png")) > 100
    norm_c = float(np.linalg.norm(np.asarray(c)))
    for key in ("learned_deviation", "optimal_deviation"):
        np.testing.assert_allclose(s["curves"][key], norm_c, rtol=1e-3, err_msg=key)
    np.testing.assert_allclose(s["curves"]["denoising"][0], norm_c, rtol=1e-3)
    assert s["memorisation"]["optimal"]["nn_distance_mean"] < 1e-4
