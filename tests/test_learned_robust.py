"""The denoiser form's eps-error control for learned networks (``max_gain``) and the optional peer run.

* guard_grid: every step's own eps-error gain |m_{t'}| / |w_t| (recomputed here from the family's float64
  transition and square root, w = R^{-1} m) is at most the bound afterwards, the grid keeps its length, its
  ends and its order, and a grid that already satisfies the bound is returned unchanged;
* the history control: with max_gain every step's history gain sum_j |V_ij| / |w_{i-j}| (recomputed from the
  tables) is within the bound, and a single data point is still sampled exactly (the control only lowers orders);
* bad values are errors naming the fix; the peer run without diffusers names ``pip install -e '.[peers]'``.
"""
from __future__ import annotations

import builtins
import math

import jax
import numpy as np
import pytest

from diffusion_jax import sdes
from diffusion_jax.param import square_root
from diffusion_jax.samplers import exponential, prior_init, sample, time_grid
from diffusion_jax.samplers.plan import make_plan

from test_samplers import dirac_denoiser, reference_dirac_pf_ode


def _gain(sde, t, t_next):
    """|m_{t_next}| * |R_t^{-1} m_t|^{-1}, independently of exponential.py."""
    m = lambda s: sde.transition_np(t=s, s=0.0)[:, 0]
    w = np.linalg.solve(np.linalg.cholesky(sde.covariance_np(t)), m(t))       # |w| is the same for any root
    return np.linalg.norm(m(t_next)) / np.linalg.norm(w)


@pytest.mark.parametrize("name,params", [("cld", {}), ("vp", {})])
def test_guard_grid_bounds_every_step(name, params):
    sde = sdes.make(name, **params)
    sqrt = square_root(sde, "R")
    ts = time_grid(sde, 5, "power", t_end=1e-3, rho=6.0)                     # a huge first step
    assert _gain(sde, ts[0], ts[1]) > 20.0
    guarded = exponential.guard_grid(sde, sqrt, ts, 5.0)
    assert len(guarded) == len(ts) and guarded[0] == ts[0] and guarded[-1] == ts[-1]
    assert np.all(np.diff(guarded) < 0)
    gains = [_gain(sde, guarded[i], guarded[i + 1]) for i in range(len(ts) - 2)]
    assert max(gains) <= 5.0 * (1 + 1e-6), gains       # float64 roots of a near-singular Sigma
    assert gains[0] == pytest.approx(5.0, rel=1e-6)                          # shortened just enough
    # already within the bound: unchanged
    loose = exponential.guard_grid(sde, sqrt, guarded, 1e6)
    assert np.array_equal(loose, guarded)
    # the plan applies it with max_gain, and says so
    p2 = make_plan(sde, "gddim", 5, "R", max_gain=5.0, t_end=1e-3)
    assert "guarded" in p2.meta["grid"] and np.allclose(
        p2.ts, exponential.guard_grid(sde, sqrt, make_plan(sde, "gddim", 5, "R", max_gain=math.inf,
                                                           t_end=1e-3).ts, 5.0))


def test_history_gain_within_bound_and_single_point_exact():
    sde = sdes.make("cld")
    plan = make_plan(sde, "gddim", 10, "R", predict="denoiser", max_gain=5.0)
    v, ts = plan.tables["v"], plan.ts
    w_norm = [np.linalg.norm(np.linalg.solve(np.linalg.cholesky(sde.covariance_np(t)),
                                             sde.transition_np(t=t, s=0.0)[:, 0])) for t in ts]
    for i in range(v.shape[0]):
        g = sum(np.linalg.norm(v[i, j]) / w_norm[i - j] for j in range(1, v.shape[1]) if i - j >= 0)
        assert g <= 5.0 * (1 + 1e-6), (i, g)
    unguarded = make_plan(sde, "gddim", 10, "R", predict="denoiser", max_gain=math.inf, grid="power", rho=4.0,
                          order=3, corrector=3)
    bounded = make_plan(sde, "gddim", 10, "R", predict="denoiser", max_gain=5.0, grid="power", rho=4.0, order=3,
                        corrector=3)
    assert sum(bounded.meta["orders"]) < sum(unguarded.meta["orders"])      # the bound did lower orders
    # a single data point stays exact (float32, relative to the state's scale)
    u0 = prior_init(sde, jax.random.PRNGKey(0), 3, (2,))
    ref = reference_dirac_pf_ode(sde, u0, 1e-3)
    u, info = sample(sde, dirac_denoiser, u0, method="gddim", nfe=10, output="denoiser", t_end=1e-3,
                     predict="denoiser", max_gain=5.0)
    assert info.config["max_gain"] == 5.0
    assert np.abs(np.asarray(u, np.float64) - ref).max() / np.abs(ref).max() <= 1e-4


def test_max_gain_bad_input():
    sde = sdes.make("cld")
    with pytest.raises(ValueError, match="max_gain must be a number > 0"):
        make_plan(sde, "gddim", 5, "R", predict="denoiser", max_gain=0.0)
    with pytest.raises(ValueError, match="needs predict='denoiser'"):
        make_plan(sde, "gddim", 5, "R", predict="eps", max_gain=5.0)
    # the default carries the bound it was tuned under; inf turns it off
    from diffusion_jax.samplers import defaults
    assert make_plan(sde, "gddim", 5, "R").meta["max_gain"] == defaults.gain_at(
        defaults.load_table()["setup"]["max_gain"], 5)
    assert math.isinf(make_plan(sde, "gddim", 5, "R", max_gain=math.inf).meta["max_gain"])


def test_peers_without_diffusers_names_the_extra(monkeypatch):
    from diffusion_jax.apps import bench_solvers
    real_import = builtins.__import__

    def no_diffusers(name, *a, **k):
        if name.split(".")[0] in ("diffusers", "torch"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_diffusers)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[peers\]'"):
        bench_solvers.main(["--peers", "--nfe", "5"])


def test_tuner_measures_candidates_under_the_bound(tmp_path):
    """bench-solvers --tune with a bound: the stored grid (the one that ran) is within it, the entry and the
    table's setup record it, and it is not the unguarded power grid (whose first step exceeds the bound)."""
    from diffusion_jax.apps import bench_solvers
    from diffusion_jax.samplers import defaults
    path = str(tmp_path / "tuned.json")
    table = bench_solvers.tune(path, families=("vp",), nfes=(4,), n_samples=8, rhos=(6.0,), rounds=1,
                               descent_max_nfe=4, max_gain={4: 3.0, 20: 50.0})
    sde = sdes.make("vp")
    e = table["entries"][defaults.family_key(sde)]["4"]
    assert e["max_gain"] == 3.0 and table["setup"]["max_gain"] == {"4": 3.0, "20": 50.0}
    ts = defaults.power_grid(np.asarray(e["s"]), e["rho"], sde.T, 1e-3)
    gains = [_gain(sde, ts[i], ts[i + 1]) for i in range(len(ts) - 2)]
    assert max(gains) <= 3.0 * (1 + 1e-6), gains
    assert _gain(sde, *time_grid(sde, 4, "power", t_end=1e-3, rho=6.0)[:2]) > 3.0
    # the plan reads it back: nothing chosen -> this grid and bound
    cfg = defaults.gddim_defaults(sde, 4, sde.T, 1e-3, table=defaults.load_table(path))
    assert cfg["max_gain"] == 3.0 and np.allclose(cfg["ts"], ts)
    # a retune of one cell under another bound: its entry records that bound, its command is appended, and the
    # setup stays the first run's (which still describes the other entries)
    again = bench_solvers.tune(path, families=("vp",), nfes=(4,), n_samples=8, rhos=(6.0,), rounds=0,
                               max_gain=10.0)
    assert again["entries"][defaults.family_key(sde)]["4"]["max_gain"] == 10.0
    assert again["setup"]["max_gain"] == {"4": 3.0, "20": 50.0} and again["setup"]["rounds"] == 1
    assert len(again["commands"]) == 2 and "--max-gain 10 " in again["commands"][1]
    assert again["commands"][1].endswith("--tune-rhos 6 --tune-rounds 0")    # non-default search: replayable
    with pytest.raises(ValueError, match="max_gain must be > 0"):
        bench_solvers.tune(path, families=("vp",), nfes=(4,), max_gain=0.0)
    with pytest.raises(ValueError, match=r"rhos \(power-grid exponents\) must be finite and > 0"):
        bench_solvers.tune(path, families=("vp",), nfes=(4,), rhos=(0.0, 2.0))
    with pytest.raises(ValueError, match="rounds must be >= 0"):
        bench_solvers.main(["--tune", "--tune-rounds", "-1", "--tune-out", path])
    with pytest.raises(ValueError, match="--tune-rhos takes a comma list of numbers"):
        bench_solvers.main(["--tune", "--tune-rhos", "1,x", "--tune-out", path])


def test_tuner_validation_keeps_the_better_entry(tmp_path):
    """bench-solvers --tune --validate: a retune replaces a stored entry only when the new one has the smaller
    error on held-out draws (seed 200). A stored entry made worse on purpose is replaced by the tuned one; a
    stored entry better than a weaker retune's candidate is kept; entries record their provenance."""
    import json

    from diffusion_jax import exact
    from diffusion_jax.apps import bench_solvers
    from diffusion_jax.exact import exact_eps_fn
    from diffusion_jax.samplers import defaults

    sde = sdes.make("vp")
    key = defaults.family_key(sde)
    path, other = str(tmp_path / "tuned.json"), str(tmp_path / "weak.json")
    kw = dict(families=("vp",), nfes=(4,), n_samples=8, rounds=1, descent_max_nfe=4, max_gain=30.0)
    tuned = bench_solvers.tune(path, rhos=(6.0,), **kw)["entries"][key]["4"]
    assert tuned["n_samples"] == 8 and tuned["seed"] == 100 and "validation" not in tuned
    # held-out errors of any entry, run as the plan runs it
    fn = exact_eps_fn(sde, exact.ring_of_gaussians(8, 1.0, 0.01))
    runner = bench_solvers._scan_runner(sde, fn)
    uv = prior_init(sde, jax.random.PRNGKey(200), 16, (2,))
    rv = bench_solvers._reference_x(sde, fn, uv, 1e-3)
    err = lambda e: bench_solvers._entry_error(sde, runner, uv, rv, e, 1e-3)

    # a worse stored entry (order 1 on a grid uniform in t, same bound) is replaced
    bad = dict(tuned, order=1, corrector=-1, rho=1.0, s=[1.0, 0.75, 0.5, 0.25, 0.0])
    assert err(bad) > 1.5 * err(tuned)
    table = json.load(open(path))
    table["entries"][key]["4"] = bad
    json.dump(table, open(path, "w"))
    out = bench_solvers.tune(path, rhos=(6.0,), validate=16, **kw)
    e = out["entries"][key]["4"]
    assert e["s"] == tuned["s"] and e["rho"] == tuned["rho"]
    assert e["validation"]["seed"] == 200 and np.isclose(e["validation"]["error"], err(tuned), rtol=1e-5)
    assert len(out["commands"]) == 2 and out["commands"][1].endswith("--validate 16")

    # a weaker retune (rho 1 only, no descent) whose candidate is worse: the stored entry stays
    weak = bench_solvers.tune(other, rhos=(1.0,), **dict(kw, rounds=0))["entries"][key]["4"]
    assert err(weak) > err(tuned)
    e = bench_solvers.tune(path, rhos=(1.0,), validate=16, **dict(kw, rounds=0))["entries"][key]["4"]
    assert e["s"] == tuned["s"] and e["rho"] == tuned["rho"]
    with pytest.raises(ValueError, match="validate_seed"):
        bench_solvers.tune(path, families=("vp",), nfes=(4,), validate=16, validate_seed=100)


def test_single_step_tuner_stores_what_the_plan_runs(tmp_path, monkeypatch):
    """bench-solvers --tune --tune-stages: the entry (layout, fractions, guarded grid) is read back by the plan
    with nothing chosen, its steps are within the bound, and the error the tuner measured for it is the error of
    that sample() run on the same draws."""
    from diffusion_jax import exact
    from diffusion_jax.apps import bench_solvers
    from diffusion_jax.samplers import defaults, plan, prior_init, sample
    path = str(tmp_path / "tuned.json")
    table = bench_solvers.tune(path, families=("vp",), nfes=(5,), n_samples=8, rhos=(3.0,), rounds=1,
                               max_gain=3.0, stages=(1, 2, 2))
    sde = sdes.make("vp")
    e = table["entries"][defaults.family_key(sde)]["5"]
    assert e["stages"] == [1, 2, 2] and len(e["fractions"]) == 3 and e["max_gain"] == 3.0
    assert table["commands"][-1].endswith("--tune-rhos 3 --tune-rounds 1 --tune-stages 1,2,2")
    ts = defaults.power_grid(np.asarray(e["s"]), e["rho"], sde.T, 1e-3)
    assert max(_gain(sde, ts[i], ts[i + 1]) for i in range(len(ts) - 2)) <= 3.0 * (1 + 1e-6)
    monkeypatch.setattr(defaults, "load_table", lambda path=path: table)
    plan._plan.cache_clear()
    mix = exact.ring_of_gaussians(8, 1.0, 0.01)
    fn = bench_solvers.exact_eps_fn(sde, mix)
    u0 = prior_init(sde, jax.random.PRNGKey(100), 8, (2,))
    u, info = sample(sde, fn, u0, method="gddim", nfe=5, t_end=1e-3)
    plan._plan.cache_clear()
    assert info.config["stages"] == (1, 2, 2) and info.nfe == 5
    assert np.allclose(info.config["steps"], ts, rtol=1e-9)
    ref = bench_solvers._reference_x(sde, fn, u0, 1e-3)
    err = float(np.mean(np.linalg.norm(np.asarray(u[..., 0], np.float64) - ref, axis=1)))
    assert np.isclose(err, e["tune_error"], rtol=1e-5), (err, e["tune_error"])
    with pytest.raises(ValueError, match="stages must be counts in 1..3"):
        bench_solvers.tune(path, families=("vp",), nfes=(6,), stages=(1, 2, 2))
