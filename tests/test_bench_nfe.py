"""bench-nfe (sample quality versus NFE of a trained run) and bpd (bits/dim of a trained run).

One tiny digits CLD run is trained in-process (module fixture) and benchmarked through the function API.
The bits/dim arithmetic is checked where the answer is known in closed form: a mixed-score network whose
own part is zero has eps exactly equal to the Gaussian reference model's, so its probability-flow ODE
transports N(0, C_t), C_t = sigma_data^2 m_t m_t^T + Sigma_t, and the model density at t_eps is that Gaussian.
"""
from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.apps import bench_nfe, bpd
from diffusion_jax.training import configs
from diffusion_jax.__main__ import main as cli_main
from diffusion_jax.training import Experiment, build_experiment, sample_data, train

TINY = dict(nf=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=())
N = 24


def _tiny(family: str, data_dir: str, steps: int = 20):
    c = configs.digits(family)
    for k, v in TINY.items():
        c.model.kwargs[k] = v
    c.training.batch_size = 32
    c.training.num_steps = steps
    c.training.log_every = steps
    c.training.ckpt_every = steps
    c.training.async_checkpoints = False
    c.ema_rates = (0.9, 0.99)
    c.data.data_dir = data_dir
    c.model.K = "L"                      # no R table to build: faster set-up
    return c


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(workdir, experiment, state) of a 6-step tiny digits CLD run."""
    root = tmp_path_factory.mktemp("bench_nfe")
    config = _tiny("cld", str(root / "tfds"), steps=6)
    workdir = str(root / "run")
    out = train(config, workdir)
    assert out["step"] == 6
    return workdir, out["experiment"], out["state"]


def test_bench_nfe_cells_nfe_noise_and_resume(tiny_run, tmp_path, monkeypatch, capsys):
    workdir, exp, state = tiny_run
    # Count every network call the samplers make (a host callback inside the jitted solves).
    hits = []
    apply = Experiment.apply

    def counting_apply(self, params, u, t):
        jax.debug.callback(lambda: hits.append(1))
        return apply(self, params, u, t)

    monkeypatch.setattr(Experiment, "apply", counting_apply)
    calls = []
    real = bench_nfe.sample_cell

    def sample_cell(*args, **kwargs):
        before = len(hits)
        x, nfe = real(*args, **kwargs)
        calls.append((args[3].label, args[4], nfe, len(hits) - before))
        return x, nfe

    monkeypatch.setattr(bench_nfe, "sample_cell", sample_cell)
    out = str(tmp_path / "bench")
    kw = dict(samplers="gddim,heun", nfes="3,6", metric="fd-pixels", n_samples=N, seed=3, out=out)
    res = bench_nfe.run(workdir, loaded=(exp, state), verbose=False, **kw)

    # files and names
    for name in ("results.csv", "results.md", "nfe_vs_fd-pixels.png", "ref_pixels_stats_train.npz"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert res["metric"] == "fd-pixels" and res["ema"] == "0.99" and res["step"] == 6
    md = open(res["markdown"]).read()
    assert "fd-pixels" in md and "FID" not in md and "Floor" in md
    rows = bench_nfe.read_results(res["csv"])
    assert {r["metric"] for r in rows} == {"fd-pixels"}
    cells = {(r["sampler"], int(r["nfe_budget"])): r for r in rows}
    assert len(rows) == 5 and len(cells) == 5

    # the exact NFE: gddim 1/step, heun 2/step (budget 3 -> one step), + 1 final denoising evaluation;
    # and it is the number of network calls that actually happened
    expected = {("gddim", 3): 4, ("gddim", 6): 7, ("heun", 3): 3, ("heun", 6): 7, ("data:test", 0): 0}
    assert {k: int(r["nfe"]) for k, r in cells.items()} == expected
    assert [(c[0], c[1]) for c in calls] == [("gddim", 3), ("gddim", 6), ("heun", 3), ("heun", 6)]
    assert all(nfe == counted == expected[(label, budget)] for label, budget, nfe, counted in calls)
    for r in rows:
        assert math.isfinite(float(r["value"])) and float(r["value"]) > 0
    floor = cells[("data:test", 0)]
    assert int(floor["n_used"]) == N
    assert float(floor["value"]) < min(float(r["value"]) for r in rows if r is not floor)

    # every cell started from the same noise: sample_data's noise for the same seed, and the samples
    # are reproduced bit for bit
    noise = bench_nfe.initial_noise(exp, 3, N)
    assert {r["noise_sha"] for r in rows if r is not floor} == {bench_nfe.noise_fingerprint(noise)}
    saved = np.load(os.path.join(out, "samples", f"gddim_nfe6_seed3_n{N}.npz"))
    again = sample_data(exp, state.ema["0.99"], jax.random.PRNGKey(3), N, "gddim", 6)
    assert np.array_equal(saved["samples"], again) and int(saved["nfe"]) == 7

    # resume: a rerun through the CLI (run restored from disk) samples nothing and adds no rows
    capsys.readouterr()
    rc = cli_main(["bench-nfe", "--workdir", workdir, "--samplers", "gddim,heun", "--nfe", "6,3",
                   "--n-samples", str(N), "--seed", "3", "--out", out])
    printed = capsys.readouterr().out
    assert rc == 0 and len(calls) == 4 and printed.count("skipped") == 4
    assert len(bench_nfe.read_results(res["csv"])) == 5


def test_fid_without_weights_fails_before_sampling(tiny_run, tmp_path, monkeypatch, capsys):
    workdir = tiny_run[0]
    monkeypatch.delenv("DIFFUSION_JAX_FID_WEIGHTS", raising=False)

    def no_sampling(*a, **k):
        raise AssertionError("loaded or sampled before checking the FID weights")

    for name in ("sample_cell", "initial_noise"):
        monkeypatch.setattr(bench_nfe, name, no_sampling)
    monkeypatch.setattr("diffusion_jax.training.load_run", no_sampling)
    out = tmp_path / "fid"
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        bench_nfe.run(workdir, samplers="euler", nfes="4", metric="fid", n_samples=8, out=str(out))
    rc = cli_main(["bench-nfe", "--workdir", workdir, "--metric", "fid", "--out", str(out),
                   "--fid-weights", str(tmp_path / "missing.pth")])
    assert rc == 2 and "pt_inception-2015-12-05-6726825d.pth" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(ValueError, match="unknown sampler 'gdim'"):
        bench_nfe.run(workdir, samplers="gdim", metric="fd-pixels", out=str(out))
    assert bench_nfe.parse_sampler("gddim:order=2:lam=0.5").kwargs == {"order": 2, "lam": 0.5}


def test_bpd_of_tiny_run(tiny_run, tmp_path, capsys):
    workdir, exp, state = tiny_run
    out = str(tmp_path / "bpd.json")
    s = bpd.run(workdir, n=5, split="test", trace="hutchinson", t_eps=1e-3, batch=3, rtol=1e-3, atol=1e-3,
                out=out, loaded=(exp, state))
    printed = capsys.readouterr().out
    assert "bound" in printed and "±" in printed
    saved = json.load(open(out))
    assert saved["k"] == 2 and "auxiliary-marginalising bound" in saved["bound"] and saved["n"] == 5
    assert np.all(np.isfinite(saved["bpd"])) and math.isclose(saved["bpd_mean"], np.mean(saved["bpd"]))
    assert math.isclose(saved["bpd_sem"], np.std(saved["bpd"], ddof=1) / math.sqrt(5))
    assert s["bpd_mean"] > 0 and all(n > 0 for n in saved["nfe"])
    # the k = 2 bound: log p(x, a) - log r(a | x), then bits/dim with the 17-level cell (+ log2(16/2) bits)
    logp = np.asarray(saved["logp_state"]) - np.asarray(saved["log_q_aux"])
    np.testing.assert_allclose(saved["logp"], logp, rtol=1e-6)
    np.testing.assert_allclose(saved["bpd"], -logp / (64 * math.log(2)) + 3.0, rtol=1e-5)


def _gaussian_log_density(u: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """sum over pixels of log N(u_pixel; 0, cov), u (n, *data, k)."""
    k = cov.shape[0]
    flat = u.reshape(u.shape[0], -1, k).astype(np.float64)
    inv = np.linalg.inv(cov)
    quad = np.einsum("npi,ij,npj->np", flat, inv, flat)
    _, logdet = np.linalg.slogdet(cov)
    return np.sum(-0.5 * quad - 0.5 * logdet - 0.5 * k * math.log(2 * math.pi), axis=1)


def test_bpd_is_exact_for_the_gaussian_reference_model():
    """Zero network + mixed score = the Gaussian reference model, whose density at t_eps is known (VP)."""
    c = _tiny("vp", "")
    c.model.mixed_score = True
    exp = build_experiment(c, (8, 8, 1))
    # eps of a mixed-score network whose own part is 0 (the network is not needed: skip its compile)
    fn = exp.precond.eps_ref

    levels, t_eps = 17, 1e-3
    v = np.random.default_rng(0).integers(0, levels, size=(3, 8, 8, 1))
    x_model = (2.0 * v / (levels - 1) - 1.0).astype(np.float32)
    res = bpd.bits_per_dim_of(exp, None, x_model, jax.random.PRNGKey(2), levels=levels, trace="exact",
                              t_eps=t_eps, rtol=1e-5, atol=1e-5, batch=2, fn=fn)   # 2 batches, one padded
    x = res["x"]
    assert np.all(np.abs(x - x_model) <= 1.0 / (levels - 1) + 1e-6)           # inside its grid cell
    assert not np.allclose(x, x_model)
    m = np.asarray(exp.sde.mean_coefficient(jnp.asarray(t_eps)), np.float64)
    cov = c.data.sigma_data ** 2 * np.outer(m, m) + np.asarray(exp.sde.covariance(jnp.asarray(t_eps)), np.float64)
    logp = _gaussian_log_density(x[..., None], cov)
    # bits/dim with the 17-level grid: cell width 2/16 in model space, so + log2(8) = + 3 bits
    expected = -logp / (64 * math.log(2)) + 3.0
    np.testing.assert_allclose(res["bpd"], expected, atol=2e-4)


def test_bench_nfe_compiles_once_per_cell_over_three_batches(tiny_run, tmp_path):
    from diffusion_jax.compilation import CompileLog
    workdir, exp, state = tiny_run
    with CompileLog() as log:
        res = bench_nfe.run(workdir, loaded=(exp, state), verbose=False, samplers="gddim,euler", nfes="4",
                            metric="fd-pixels", n_samples=N - 2, batch=N // 3, seed=5, out=str(tmp_path / "b"),
                            floor_split=None)
    assert len(res["computed"]) == 2
    # 3 batches (8, 8, 6 -> padded to 8) per cell, one compiled sampler per cell
    assert log.count("sampler_") == 2, log.compiled
