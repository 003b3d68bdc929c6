"""Exact-score solver benchmark: sampler error versus NFE for every family, no network involved.

Data: a 2-D mixture of 8 Gaussians on the unit circle (variance 0.01, equal weights); its score is exact
for every linear family (diffusion_jax.exact). From 256 prior samples (fixed seed) each sampler runs from
T to t_end = 1e-3; the error is the mean L2 distance of the data coordinate to a high-accuracy reference
solve from the same initial state (diffrax Dopri5 in float64, rtol = atol = 1e-10: :func:`reference_x64`).
Stochastic samplers are scored by the sliced Wasserstein distance of their data coordinate to true mixture
samples (same for all).

``gddim_default`` is ``sample(method="gddim", nfe=N)`` with nothing else chosen (the denoiser form with the
configuration tuned under its eps-error gain bound); ``gddim_q1`` is the eps form's order 1 on the uniform grid
(the library default before the tuned bounded one); the ``gddimD_*`` entries
are the denoiser-form multistep (order q, corrector c or none, power grid with exponent p), the ``gddimS*``
entries the single-step exponential Runge-Kutta method (2 or 3 stages per step, default fractions, p = 3). The
summary
(``bench_solvers_best.md``) gives per family and NFE the best deterministic configuration tried and the
default's error and ratio to it.

:func:`tune` writes the defaults' table (``diffusion_jax/samplers/tuned_grids.json``):
``python -m diffusion_jax bench-solvers --tune`` (tuned on its own prior draws, seed 100, not the benchmark's);
``--tune-stages`` tunes a single-step entry instead.
"""
from __future__ import annotations

import csv
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import exact, sdes
from diffusion_jax.evaluation.distances import sliced_wasserstein
from diffusion_jax.exact import exact_eps_fn
from diffusion_jax.param import square_root
from diffusion_jax.samplers import prior_init, sample
from diffusion_jax.samplers.exponential import MAX_STAGES
from diffusion_jax.samplers.exponential import default_fractions as exponential_fractions

FAMILIES = {"vp": ("vp", {}), "cld": ("cld", {}), "told": ("told", {}), "cdhold4": ("cdhold", {"n": 4}),
            "psld": ("psld", {}), "cdhold3": ("cdhold", {"n": 3})}
NFES = (5, 10, 20, 50, 100, 200, 500, 1000)
# name -> (method, options); deterministic unless noted
SAMPLERS = {
    "euler": ("euler", {}), "heun": ("heun", {}), "midpoint": ("midpoint", {}),
    "edm_heun": ("edm_heun", {}),
    "gddim_q0": ("gddim", dict(order=0, grid="uniform", predict="eps")),
    "gddim_q1": ("gddim", dict(order=1, grid="uniform", predict="eps")),
    "gddim_q2": ("gddim", dict(order=2, grid="uniform", predict="eps")),
    "gddim_q3": ("gddim", dict(order=3, grid="uniform", predict="eps")),
    "gddim_q1_logsnr": ("gddim", dict(order=1, grid="logsnr", predict="eps")),
    "gddim_q2_logsnr": ("gddim", dict(order=2, grid="logsnr", predict="eps")),
    "gddim_q2_quad": ("gddim", dict(order=2, grid="quadratic", predict="eps")),
    "sscs_ode": ("sscs", dict(lam=0.0)),
    "euler_maruyama": ("euler_maruyama", {}), "sscs": ("sscs", dict(lam=1.0)),
    "gddim_stoch": ("gddim", dict(order=0, lam=1.0)),
    "gddim_default": ("gddim", {}),
}
# the denoiser-form multistep on power grids: order q, corrector c (or none), exponent p
for _q in (1, 2, 3):
    for _c in (-1, _q):
        for _p in (3.0, 6.0):
            SAMPLERS[f"gddimD_q{_q}_c{'none' if _c < 0 else _c}_p{_p:g}"] = (
                "gddim", dict(order=_q, corrector=_c, grid="power", rho=_p, predict="denoiser"))
for _q in (2, 3):
    SAMPLERS[f"gddim_q{_q}_p4"] = ("gddim", dict(order=_q, grid="power", rho=4.0, predict="eps"))
# single-step exponential Runge-Kutta with 2 / 3 stages per step (default stage fractions), power grid p = 3
for _s in (2, 3):
    SAMPLERS[f"gddimS{_s}_p3"] = ("gddim", dict(stages=_s, grid="power", rho=3.0))
# the benchmark's data: ring_of_gaussians' keyword arguments
RING = dict(n=8, radius=1.0, variance=0.01)
STOCHASTIC = {"euler_maruyama", "sscs", "gddim_stoch"}




def run(out_dir: str, families=None, samplers=None, nfes=NFES, n_samples: int = 256, t_end: float = 1e-3,
        seed: int = 0) -> list[dict]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    families = families or list(FAMILIES)
    samplers = samplers or list(SAMPLERS)
    for name in families:
        if name not in FAMILIES:
            raise ValueError(f"unknown family {name!r}; choose from {list(FAMILIES)}")
    for name in samplers:
        if name not in SAMPLERS:
            raise ValueError(f"unknown sampler {name!r}; choose from {list(SAMPLERS)}")
    mix = exact.ring_of_gaussians(**RING)
    true = np.asarray(mix.sample(jax.random.PRNGKey(seed + 1), n_samples))
    rows = []
    for fam in families:
        sde = sdes.make(FAMILIES[fam][0], **FAMILIES[fam][1])
        fn = exact_eps_fn(sde, mix)
        u0 = prior_init(sde, jax.random.PRNGKey(seed), n_samples, (2,))
        start = time.perf_counter()
        ref = reference_x64(sde, RING, u0, t_end)
        print(f"[{fam}] reference: float64 dopri5 in {time.perf_counter() - start:.1f} s; "
              f"SW(reference, data) = {sliced_wasserstein(ref, true):.4f}", flush=True)
        fig, ax = plt.subplots(figsize=(7, 5))
        for sname in samplers:
            method, opts = SAMPLERS[sname]
            opts = dict(opts)
            errs = []
            for nfe in nfes:
                if method == "gddim" and opts.get("order", 0) > nfe - 1:
                    continue
                start = time.perf_counter()
                try:
                    u, info = sample(sde, fn, u0, method=method, nfe=nfe, t_end=t_end,
                                     key=jax.random.PRNGKey(seed + 2), **opts)
                except ValueError as e:                      # e.g. heun needs nfe >= 2
                    print(f"  skip {sname} nfe={nfe}: {e}")
                    continue
                x = np.asarray(u[..., 0], np.float64)
                ok = bool(np.all(np.isfinite(x)))
                err = float(np.mean(np.linalg.norm(x - ref, axis=1))) if ok else float("nan")
                sw = sliced_wasserstein(x, true) if ok else float("nan")
                row = dict(family=fam, sampler=sname, nfe_requested=nfe, nfe=info.nfe,
                           mean_l2_to_reference=err, sliced_w2_to_data=sw,
                           seconds=time.perf_counter() - start)
                rows.append(row)
                errs.append((info.nfe, sw if sname in STOCHASTIC else err))
                print(f"  {sname:16s} nfe={info.nfe:5d}  L2 to ref {err:.3e}  SW to data {sw:.4f}", flush=True)
            if errs:
                xs, ys = zip(*errs)
                ax.loglog(xs, ys, "o-" if sname not in STOCHASTIC else "x--", label=sname, ms=3)
        ax.set(title=f"{fam}: exact-score sampling error (stochastic: sliced W2 to data)", xlabel="NFE",
               ylabel="mean L2 to reference")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"error_vs_nfe_{fam}.png"), dpi=110)
        plt.close(fig)
    _write_tables(rows, out_dir)
    return rows


def _write_tables(rows: list[dict], out_dir: str) -> None:
    if not rows:
        return
    with open(os.path.join(out_dir, "bench_solvers.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    fams = sorted({r["family"] for r in rows}, key=list(FAMILIES).index)
    lines = ["# Exact-score solver benchmark", "",
             "Mean L2 error of the data coordinate against a float64 Dopri5 (rtol=atol=1e-10) reference from the "
             "same 256 prior samples, T -> t = 1e-3, 8-Gaussian ring. Stochastic samplers: sliced W2 to data.", ""]
    for fam in fams:
        sub = [r for r in rows if r["family"] == fam]
        nfes = sorted({r["nfe_requested"] for r in sub})
        lines += [f"## {fam}", "", "| sampler | " + " | ".join(str(n) for n in nfes) + " |",
                  "|---|" + "---|" * len(nfes)]
        for s in dict.fromkeys(r["sampler"] for r in sub):
            cells = []
            for n in nfes:
                r = next((r for r in sub if r["sampler"] == s and r["nfe_requested"] == n), None)
                key = "sliced_w2_to_data" if s in STOCHASTIC else "mean_l2_to_reference"
                cells.append("" if r is None else f"{r[key]:.2e} ({r['nfe']})")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
    with open(os.path.join(out_dir, "bench_solvers.md"), "w") as f:
        f.write("\n".join(lines))
    best = best_table(rows)
    with open(os.path.join(out_dir, "bench_solvers_best.md"), "w") as f:
        f.write("\n".join(best))
    print("\n".join(best))
    print(f"wrote {out_dir}/bench_solvers.md, bench_solvers_best.md, .csv and error_vs_nfe_*.png")


def best_table(rows: list[dict]) -> list[str]:
    """Per family and requested NFE: the best deterministic configuration tried, the default's error and
    their ratio (``gddim_default`` / best; the defaults are meant to stay within 1.1)."""
    lines = ["# Best configuration vs the gddim default", "",
             "| family | NFE | best | best error | default error | default / best |", "|---|---|---|---|---|---|"]
    fams = sorted({r["family"] for r in rows}, key=list(FAMILIES).index)
    for fam in fams:
        for nfe in sorted({r["nfe_requested"] for r in rows if r["family"] == fam}):
            sub = [r for r in rows if r["family"] == fam and r["nfe_requested"] == nfe
                   and r["sampler"] not in STOCHASTIC and r["nfe"] <= nfe and np.isfinite(r["mean_l2_to_reference"])]
            if not sub:
                continue
            b = min(sub, key=lambda r: r["mean_l2_to_reference"])
            d = next((r for r in sub if r["sampler"] == "gddim_default"), None)
            d_err = "" if d is None else f"{d['mean_l2_to_reference']:.2e}"
            ratio = "" if d is None else f"{d['mean_l2_to_reference'] / b['mean_l2_to_reference']:.2f}"
            lines.append(f"| {fam} | {nfe} | {b['sampler']} | {b['mean_l2_to_reference']:.2e} | {d_err} | {ratio} |")
    return lines


# ------------------------------------------------------------------ tuning the gddim defaults
TUNE_FAMILIES = ("vp", "cld", "psld", "told", "cdhold4", "cdhold3")
TUNE_NFES = (5, 10, 20, 50)
TUNE_RHOS = (2.0, 3.0, 4.0, 6.0)
TUNE_ROUNDS = 2                                 # coordinate-descent sweeps
# The eps-error gain bound the defaults are tuned under, per NFE (the nearest NFE's between them): 5 at NFE 5,
# 3 from NFE 10 on. Chosen on learned networks (digits CLD / CD-HOLD 3 / VP, bench-nfe fd-pixels from the same
# noise) against the exact-score error: at NFE 5 a bound of 3 leaves too little of the interval to the other
# steps (exact-score error 0.63 for vp, 0.76 for cld), at NFE >= 10 it costs little and is the safer one. (The
# stored VP NFE 5 entry is a retune under 10: see the table's commands and the README.)
TUNE_MAX_GAIN: dict = {5: 5.0, 10: 3.0}


def _tune_family(sde, runner, u0, ref, nfes, rhos, rounds, descent_max_nfe, t_end, log, max_gain=math.inf,
                 starts: int = 1):
    """Per NFE: best (order, corrector, rho) on uniform s, then coordinate descent on log s-increments
    (``starts`` > 1: from each of that many best uniform-s configurations, keeping the best descended one;
    the best uniform start is often not the best after descent, e.g. told NFE 10 on 512 draws: order 3 with
    rho 6 starts at 0.273 and ends at 0.250, order 2 with rho 2 starts at 0.274 and ends at 0.109).

    ``max_gain``: a number, or {nfe: bound} (:func:`defaults.gain_at`: the nearest NFE's). With a finite bound
    every candidate is run as the plan will run it: its grid guarded
    (:func:`exponential.guard_grid`) and its per-step orders controlled (``step_tables(max_gain=...)``), so
    the optimum is the best *bounded* configuration; the stored s is that of the guarded grid. ``runner``:
    :func:`_scan_runner`."""
    from diffusion_jax.samplers.defaults import gain_at

    gain = math.inf                                # the current NFE's bound (set in the loop below)

    def grid(s, rho):
        return _guarded_grid(sde, s, rho, gain, t_end)

    def err(s, rho, q, c):
        return _run_error(sde, runner, u0, ref, s, rho, q, c, gain, t_end)

    def s_of(z):
        w = np.exp(z)
        return (1.0 - np.concatenate([[0.0], np.cumsum(w)]) / w.sum())

    def z_of(s):                                   # the log increments of a decreasing s (inverse of s_of)
        return np.log(np.maximum(-np.diff(np.asarray(s, np.float64)), 1e-12))

    def s_guarded(s, rho):                         # the s of the grid that runs
        return _s_of_grid(sde, grid(s, rho), rho, t_end)

    out = {}
    for nfe in nfes:
        gain = gain_at(max_gain, nfe)
        uniform = []
        for q in range(1, min(3, nfe - 1) + 1):
            for c in (-1, q, q + 1):
                for rho in rhos:
                    uniform.append((err(s_of(np.zeros(nfe)), rho, q, c), (q, c, rho)))
        uniform.sort(key=lambda r: r[0])
        best = None
        for e0, (q, c, rho) in uniform[:max(1, starts)]:
            # descend from the grid that actually runs (the guard is many-to-one: flat in the unguarded s)
            z, e_best, step = z_of(s_guarded(s_of(np.zeros(nfe)), rho)), e0, 0.4
            if nfe <= descent_max_nfe:
                for _ in range(rounds):
                    for k in range(nfe):
                        for sgn in (1.0, -1.0):
                            z2 = z.copy()
                            z2[k] += sgn * step
                            e = err(s_of(z2), rho, q, c)
                            if e < e_best:
                                z, e_best = z2, e
                                break
                    step *= 0.6
            if best is None or e_best < best[1]:
                best = (e0, e_best, z, (q, c, rho))
        e0, e_best, z, (q, c, rho) = best
        out[str(nfe)] = dict(order=q, corrector=c, rho=rho, s=[float(v) for v in s_guarded(s_of(z), rho)],
                             max_gain=gain if math.isfinite(gain) else None,
                             tune_error_power_grid=e0, tune_error=e_best)
        log(f"  nfe={nfe}: order={q} corrector={c} rho={rho:g} max_gain={gain:g}: {e0:.3e} (uniform s) -> "
            f"{e_best:.3e} (tuned)")
    return out


def _s_of_grid(sde, ts: np.ndarray, rho: float, t_end: float) -> np.ndarray:
    """The power-grid nodes s of a grid (the power map inverted; the ends pinned to 1 and 0)."""
    lo, hi = t_end ** (1.0 / rho), sde.T ** (1.0 / rho)
    out = (np.asarray(ts, np.float64) ** (1.0 / rho) - lo) / (hi - lo)
    out[0], out[-1] = 1.0, 0.0
    return out


def _tune_layout(sde, runner, u0, ref, layout: tuple[int, ...], rhos, gain: float, t_end: float,
                 starts: int, rounds: int, log, stored: dict | None = None) -> dict:
    """A single-step entry for ``layout`` (stages per step): coordinate descent over the grid nodes s and every
    step's stage fractions together (step 0.08, halved after each converged sweep, ``rounds`` halvings), from
    the uniform grid with the default fractions and from ``starts`` - 1 perturbations of it (normal, sd 0.05,
    seeds 1, 2, ...): the error surface has many local minima (TOLD NFE 10, stages 1,1,3,3,2, 512 draws: the
    descended errors of 8 starts spread over 4.1e-2 .. 1.2e-1). The exponent is the one of ``rhos`` best at the
    uniform start. ``stored``: the table's entry for this NFE; when it has the same layout, exponent and bound (a
    retune) the descent starts from it first (on this run's draws). Every candidate runs on its grid guarded by the
    gain bound, as the plan runs it; fractions stay in [0.05, 0.95]."""
    n = len(layout)
    x0 = np.concatenate([np.linspace(1.0, 0.0, n + 1)[1:-1]] + [exponential_fractions(st) for st in layout])

    def unpack(x):
        fr, k = [], n - 1
        for st in layout:
            fr.append(tuple(float(r) for r in x[k:k + st - 1]))
            k += st - 1
        return np.concatenate([[1.0], x[:n - 1], [0.0]]), tuple(fr)

    def err(x, rho):
        s, fr = unpack(x)
        if np.any(np.diff(s) >= 0) or not all(a < b for f in fr for a, b in zip((0.05,) + f, f + (0.95,))):
            return math.inf
        return _single_error(sde, runner, u0, ref, s, rho, layout, fr, gain, t_end)

    rho = min(rhos, key=lambda r: err(x0, r))
    if stored is not None and not (stored.get("stages") == list(layout) and stored["rho"] == rho
                                   and stored.get("max_gain") == (gain if math.isfinite(gain) else None)):
        stored = None
    inits = [x0 + (np.random.default_rng(k).normal(0.0, 0.05, x0.shape) if k else 0.0) for k in range(starts)]
    if stored is not None:
        inits.insert(0, np.concatenate([stored["s"][1:-1]] + [np.asarray(f, np.float64) for f in stored["fractions"]]))
    best = None
    for start, x in enumerate(inits, start=-1 if stored is not None else 0):
        e_best = err(x, rho)
        step = 0.08
        for _ in range(rounds):
            improved = True
            while improved:
                improved = False
                for k in range(len(x)):
                    for sgn in (1.0, -1.0):
                        x2 = x.copy()
                        x2[k] += sgn * step
                        e = err(x2, rho)
                        if e < e_best:
                            x, e_best, improved = x2, e, True
            step /= 2
        log(f"  stages={','.join(map(str, layout))} start {'stored' if start < 0 else start}: {e_best:.3e}")
        if best is None or e_best < best[0]:
            best = (e_best, x)
    e_best, x = best
    if not math.isfinite(e_best):
        raise ValueError(f"no descent of stages {layout} ended finite: try other stages or more --tune-starts")
    s, fr = unpack(x)
    ts = _guarded_grid(sde, s, rho, gain, t_end)
    return dict(stages=list(layout), fractions=[list(f) for f in fr], rho=rho,
                s=[float(v) for v in _s_of_grid(sde, ts, rho, t_end)],
                max_gain=gain if math.isfinite(gain) else None, tune_error_power_grid=err(x0, rho), tune_error=e_best)


def _single_error(sde, runner, u0, ref, s, rho: float, layout, fractions, gain: float, t_end: float) -> float:
    """Mean L2 error of a single-step configuration run as the plan runs it (its grid guarded by the bound)."""
    import jax.numpy as jnp

    from diffusion_jax.samplers import exponential
    ts = _guarded_grid(sde, s, rho, gain, t_end)
    tab = exponential.single_step_tables(sde, square_root(sde, "R"), tuple(float(t) for t in ts), tuple(layout),
                                         tuple(tuple(f) for f in fractions))
    return _error_of(runner(u0, {k: jnp.asarray(tab[k], u0.dtype) for k in exponential.SCAN_KEYS}), ref)


def _error_of(x, ref) -> float:
    err = float(np.mean(np.linalg.norm(np.asarray(x[..., 0], np.float64) - ref, axis=1)))
    return err if np.isfinite(err) else math.inf


def _scan_runner(sde, fn):
    """The jitted multistep scan on the exact eps ``fn`` (tables as arguments: one compile per grid length)."""
    from diffusion_jax.param import Model
    from diffusion_jax.samplers import exponential
    model = Model(sde, fn, "eps", "R")
    return jax.jit(lambda u, tab: exponential.multistep_scan(sde, model, u, tab)[0])


def _reference_x(sde, fn, u0, t_end: float) -> np.ndarray:
    """Data coordinate (as float64) of the tuner's reference: Dopri5 at rtol = atol = 1e-7 from ``u0``, in its
    precision (the tuned errors are >= 1e-5; :func:`reference_x64` is the benchmark's)."""
    ref, _ = sample(sde, fn, u0, method="dopri5", rtol=1e-7, atol=1e-7, t_end=t_end, max_steps=100_000)
    return np.asarray(ref[..., 0], np.float64)


def reference_x64(sde, mixture: dict, u0, t_end: float) -> np.ndarray:
    """Data coordinate of the benchmark's reference: a float64 Dopri5 solve (rtol = atol = 1e-10) from ``u0``.

    x64 is enabled for this solve only. ``mixture`` holds the keyword arguments of
    :func:`exact.ring_of_gaussians`: the mixture is built inside the float64 scope, so its means and
    variances, the exact eps, the state and the family's coefficients are all float64 (a mixture built
    outside keeps float32 parameters: measured 1e-5 from the all-float64 solve). On the ring it differs from
    the float32 rtol = atol = 1e-7 solve by a mean L2 of 0.5-2e-6.
    """
    with jax.enable_x64(True):
        fn = exact_eps_fn(sde, exact.ring_of_gaussians(**mixture))
        u = jnp.asarray(np.asarray(u0), jnp.float64)
        ref, _ = sample(sde, fn, u, method="dopri5", rtol=1e-10, atol=1e-10, t_end=t_end, max_steps=1_000_000)
        if ref.dtype != jnp.float64:
            raise RuntimeError(f"the float64 reference solve returned {ref.dtype}")
        return np.asarray(ref[..., 0], np.float64)


def _guarded_grid(sde, s, rho: float, gain: float, t_end: float) -> np.ndarray:
    """The time grid the plan runs for power-grid nodes ``s``: guarded when the bound ``gain`` is finite."""
    from diffusion_jax.samplers import exponential
    from diffusion_jax.samplers.defaults import power_grid
    ts = power_grid(np.asarray(s, np.float64), rho, sde.T, t_end)
    return exponential.guard_grid(sde, square_root(sde, "R"), ts, gain) if math.isfinite(gain) else ts


def _run_error(sde, runner, u0, ref, s, rho: float, order: int, corrector: int, gain: float,
               t_end: float) -> float:
    """Mean L2 error (data coordinate, against ``ref``) of one configuration run as the plan runs it: its grid
    guarded by the bound, its per-step orders controlled (``runner``: the jitted multistep scan); inf if not
    finite."""
    import jax.numpy as jnp

    from diffusion_jax.samplers import exponential
    ts = _guarded_grid(sde, s, rho, gain, t_end)
    tab = exponential.step_tables(sde, square_root(sde, "R"), tuple(float(t) for t in ts), order, corrector,
                                  max_gain=gain if math.isfinite(gain) else None)
    return _error_of(runner(u0, {k: jnp.asarray(tab[k], u0.dtype) for k in exponential.SCAN_KEYS}), ref)


def _entry_error(sde, runner, u0, ref, e: dict, t_end: float) -> float:
    """:func:`_run_error` (:func:`_single_error` for a single-step entry) of a stored table entry."""
    gain = math.inf if e.get("max_gain") is None else float(e["max_gain"])
    if "stages" in e:
        return _single_error(sde, runner, u0, ref, e["s"], float(e["rho"]), e["stages"], e["fractions"], gain,
                             t_end)
    return _run_error(sde, runner, u0, ref, e["s"], float(e["rho"]), int(e["order"]), int(e["corrector"]), gain,
                      t_end)


def tune(path: str | None = None, families=TUNE_FAMILIES, nfes=TUNE_NFES, n_samples: int = 128, seed: int = 100,
         t_end: float = 1e-3, rhos=TUNE_RHOS, rounds: int = TUNE_ROUNDS, descent_max_nfe: int = 20,
         max_gain: float | dict | None = None, validate: int = 0, validate_seed: int = 200, starts: int = 1,
         stages: tuple[int, ...] | None = None) -> dict:
    """Measure and store the gddim defaults (see :mod:`diffusion_jax.samplers.defaults`).

    For each family and NFE: every order q = 1..3 with corrector none / q / q + 1 on power grids with
    exponent in ``rhos`` (s uniform) is run on exact mixture scores from ``n_samples`` prior draws
    (``seed``, distinct from the benchmark's); the best one's node spacing is then optimised by coordinate
    descent on the log increments of s (``rounds`` sweeps, step 0.4 shrinking by 0.6; only for
    NFE <= ``descent_max_nfe``). Every candidate runs under the eps-error gain bound ``max_gain`` (default
    :data:`TUNE_MAX_GAIN`; a number or {nfe: bound}, the nearest NFE's bound applying between them; the grid
    guarded, the per-step orders controlled, as the plan runs it; ``inf``: no bound), so the stored
    configuration is the best bounded one; the bound is stored with each entry and as the table's
    ``setup.max_gain`` (a record: families with no entry run the generic rule unbounded). The table is written as JSON to ``path`` (default:
    the package's table); entries of other families already there are kept.

    ``starts`` > 1: the descent runs from that many of the best uniform-s configurations (the best descended
    one is kept). ``validate`` = V > 0: a retune that only replaces an entry when it is better on held-out
    draws. The new candidate and the stored entry for the same (family, NFE) and bound are both run on V prior draws of
    ``validate_seed`` (neither the tuning draws nor the benchmark's, seed 0) and the one with the smaller
    mean L2 error is kept. The exact-score error on this ring is dominated by a few trajectories that end in a
    neighbouring mode (told NFE 20: 2 of 256 draws carry 39 % of it), so a tuning objective on 128 draws is
    noisy and a retune on its own is as likely to lose as to win; the held-out comparison makes retunes
    monotone. Each entry records ``n_samples``, ``seed`` and (when validated) ``validation``; the table's
    ``commands`` lists every tuning command that wrote it, in order (replaying them reproduces it).

    ``stages`` (one count in 1..3 per step): tune a single-step entry with that layout instead
    (:func:`_tune_layout`: grid nodes and stage fractions together, ``starts`` descents, ``rounds`` halvings of
    the step) for NFE = sum(stages), on the exponent of ``rhos`` best at the uniform start; validation as above.
    """
    from diffusion_jax.samplers import defaults

    path = defaults.TUNED_PATH if path is None else path
    mix = exact.ring_of_gaussians(**RING)
    from diffusion_jax.samplers.defaults import gain_at
    max_gain = TUNE_MAX_GAIN if max_gain is None else max_gain
    spec = ({str(int(k)): float(v) for k, v in max_gain.items()} if isinstance(max_gain, dict)
            else float(max_gain))
    for g in (spec.values() if isinstance(spec, dict) else [spec]):
        if not g > 0:
            raise ValueError(f"max_gain must be > 0 (inf: no bound), got {max_gain}")
    gain_at(spec, 10)
    arg = ",".join(f"{k}:{v:g}" for k, v in spec.items()) if isinstance(spec, dict) else f"{spec:g}"
    rhos = tuple(float(r) for r in rhos)
    if not rhos or not all(math.isfinite(r) and r > 0 for r in rhos):
        raise ValueError(f"rhos (power-grid exponents) must be finite and > 0, got {rhos}")
    if rounds < 0 or starts < 1:
        raise ValueError(f"rounds must be >= 0 and starts >= 1, got rounds={rounds}, starts={starts}")
    if stages is not None:
        stages = tuple(int(x) for x in stages)
        if not stages or not all(1 <= x <= MAX_STAGES for x in stages) or tuple(nfes) != (sum(stages),):
            raise ValueError(f"stages must be counts in 1..{MAX_STAGES}, one per step, with nfes = (their sum,): got "
                             f"stages={stages}, nfes={tuple(nfes)}")
    if validate < 0 or (validate and validate_seed in (seed, 0)):
        raise ValueError(f"validate must be >= 0 and validate_seed ({validate_seed}) distinct from the tuning seed "
                         f"({seed}) and the benchmark's (0)")
    command = (f"python -m diffusion_jax bench-solvers --tune --max-gain {arg}"
               + (f" --families {','.join(families)}" if tuple(families) != TUNE_FAMILIES else "")
               + (f" --nfe {','.join(str(n) for n in nfes)}" if tuple(nfes) != TUNE_NFES and stages is None else "")
               + (f" --tune-samples {n_samples}" if n_samples != 128 else "")
               + (f" --tune-starts {starts}" if starts != 1 else "")
               + (f" --tune-rhos {','.join(f'{r:g}' for r in rhos)}" if tuple(rhos) != TUNE_RHOS else "")
               + (f" --tune-rounds {rounds}" if rounds != TUNE_ROUNDS else "")
               + (f" --tune-stages {','.join(map(str, stages))}" if stages is not None else "")
               + (f" --validate {validate}" if validate else ""))
    table = dict(commands=[command],
                 setup=dict(data="ring_of_gaussians(8, 1.0, 0.01)", n_samples=n_samples, seed=seed, t_end=t_end,
                            rhos=list(rhos), rounds=rounds, descent_max_nfe=descent_max_nfe,
                            max_gain=spec if isinstance(spec, dict) or math.isfinite(spec) else None,
                            reference="dopri5 rtol=atol=1e-7", error="mean L2 of the data coordinate"),
                 entries={})
    for fam in families:
        if fam not in FAMILIES:
            raise ValueError(f"unknown family {fam!r}; choose from {list(FAMILIES)}")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        table["entries"] = old.get("entries", {})
        before = old.get("commands", [old["command"]] if "command" in old else [])
        table["commands"] = before + table["commands"]
        if before and "setup" in old:
            # the first run's setup (its entries stay); a later run is described by its command and by the
            # n_samples, seed and max_gain of the entries it wrote
            table["setup"] = old["setup"]
    for fam in families:
        sde = sdes.make(FAMILIES[fam][0], **FAMILIES[fam][1])
        fn = exact_eps_fn(sde, mix)
        u0 = prior_init(sde, jax.random.PRNGKey(seed), n_samples, (2,))
        ref = _reference_x(sde, fn, u0, t_end)
        runner = _scan_runner(sde, fn)              # shared by the tuning and the held-out runs
        print(f"[tune {fam}]", flush=True)
        from diffusion_jax.samplers.defaults import family_key
        entry = table["entries"].setdefault(family_key(sde), {})
        log = lambda m: print(m, flush=True)
        if stages is None:
            new = _tune_family(sde, runner, u0, ref, nfes, rhos, rounds, descent_max_nfe, t_end, log, spec, starts)
        else:
            nfe = sum(stages)
            new = {str(nfe): _tune_layout(sde, runner, u0, ref, stages, rhos, gain_at(spec, nfe), t_end, starts,
                                          rounds, log, entry.get(str(nfe)))}
        for e in new.values():
            e.update(n_samples=n_samples, seed=seed)
        if validate:
            uv = prior_init(sde, jax.random.PRNGKey(validate_seed), validate, (2,))
            rv = _reference_x(sde, fn, uv, t_end)
            for nfe, e in new.items():
                e["validation"] = dict(n=validate, seed=validate_seed,
                                       error=_entry_error(sde, runner, uv, rv, e, t_end))
                stored = entry.get(nfe)
                if stored is not None and stored.get("max_gain") == e["max_gain"]:
                    err_old = _entry_error(sde, runner, uv, rv, stored, t_end)
                    keep = err_old <= e["validation"]["error"]
                    print(f"  nfe={nfe}: held-out error {e['validation']['error']:.3e} (new) vs {err_old:.3e} "
                          f"(stored): keep the {'stored' if keep else 'new'} entry", flush=True)
                    if keep:
                        new[nfe] = dict(stored, validation=dict(n=validate, seed=validate_seed, error=err_old))
        entry.update(new)
        with open(path, "w") as f:
            json.dump(table, f, indent=1)
    defaults.load_table.cache_clear()
    print(f"wrote {path}")
    return table


def parse_gain(text: str | None) -> float | dict:
    """``--max-gain``: None -> :data:`TUNE_MAX_GAIN`; "5" -> 5.0; "5:5,10:3" -> {5: 5.0, 10: 3.0}."""
    if text is None:
        return TUNE_MAX_GAIN
    try:
        if ":" not in text:
            return float(text)
        return {int(k): float(v) for k, v in (item.split(":") for item in text.split(","))}
    except ValueError as e:
        raise ValueError(f"--max-gain takes a number or NFE:bound pairs like 5:5,10:3, got {text!r}") from e


def main(argv: list[str] | None = None) -> int:
    """``python -m diffusion_jax bench-solvers [--families ...] [--samplers ...] [--nfe ...]``."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m diffusion_jax bench-solvers", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench_out/solvers")
    p.add_argument("--families", default=None, help=f"comma list of {','.join(FAMILIES)}")
    p.add_argument("--samplers", default=None, help=f"comma list of {','.join(SAMPLERS)}")
    p.add_argument("--nfe", default=None, help="comma list of NFE (default 5,10,20,50,100,200,500,1000)")
    p.add_argument("--n-samples", type=int, default=256)
    p.add_argument("--peers", action="store_true",
                   help="VP only: diffusers' DPM-Solver++ (2M, 3M) and UniPC against the gddim default, same prior "
                        "draws, ratio of errors (needs pip install -e '.[peers]')")
    p.add_argument("--tune", action="store_true",
                   help="measure the gddim defaults and write diffusion_jax/samplers/tuned_grids.json")
    p.add_argument("--max-gain", default=None,
                   help="--tune: the eps-error gain bound tuned under, a number (inf: none) or NFE:bound pairs, "
                        "e.g. 5:5,10:3 (the nearest NFE's bound between them); default "
                        + ",".join(f"{k}:{v:g}" for k, v in TUNE_MAX_GAIN.items()))
    p.add_argument("--tune-out", default=None, help="--tune: write the table here instead of the package's")
    p.add_argument("--tune-samples", type=int, default=128, help="--tune: prior draws tuned on (seed 100)")
    p.add_argument("--tune-starts", type=int, default=1,
                   help="--tune: descend from this many of the best uniform-grid configurations (default 1)")
    p.add_argument("--tune-rounds", type=int, default=TUNE_ROUNDS,
                   help=f"--tune: coordinate-descent sweeps over the grid nodes (default {TUNE_ROUNDS})")
    p.add_argument("--tune-rhos", default=None,
                   help="--tune: comma list of power-grid exponents p searched (default "
                        + ",".join(f"{r:g}" for r in TUNE_RHOS) + ")")
    p.add_argument("--tune-stages", default=None,
                   help="--tune: a single-step entry with these stages per step (comma list of 1..3, e.g. 2,3,3,2; "
                        "its NFE is their sum) instead of the multistep search")
    p.add_argument("--validate", type=int, default=0,
                   help="--tune: replace a stored entry only if the new one is better on this many held-out draws "
                        "(seed 200); 0: always replace")
    a = p.parse_args(argv)
    split = lambda v: v.split(",") if v else None
    if a.peers:
        from diffusion_jax.apps import peers
        peers._import_peers()                       # a clear error naming the extra, before any work
        nfes = tuple(int(n) for n in a.nfe.split(",")) if a.nfe else peers.PEER_NFES
        peers.run(a.out, nfes, a.n_samples)
    elif a.tune:
        try:
            stages = tuple(int(x) for x in a.tune_stages.split(",")) if a.tune_stages else None
        except ValueError as e:
            raise ValueError(f"--tune-stages takes a comma list of stage counts, e.g. 2,3,3,2; got "
                             f"{a.tune_stages!r}") from e
        nfes = tuple(int(n) for n in a.nfe.split(",")) if a.nfe else (
            (sum(stages),) if stages else TUNE_NFES)
        try:
            rhos = tuple(float(r) for r in a.tune_rhos.split(",")) if a.tune_rhos else TUNE_RHOS
        except ValueError as e:
            raise ValueError(f"--tune-rhos takes a comma list of numbers, e.g. 1,1.5,2,3; got {a.tune_rhos!r}") from e
        tune(a.tune_out, tuple(split(a.families) or TUNE_FAMILIES), nfes, n_samples=a.tune_samples,
             max_gain=parse_gain(a.max_gain), validate=a.validate, starts=a.tune_starts, rhos=rhos,
             rounds=a.tune_rounds, stages=stages)
    else:
        nfes = tuple(int(n) for n in a.nfe.split(",")) if a.nfe else NFES
        run(a.out, split(a.families), split(a.samplers), nfes, a.n_samples)
    return 0
