r"""Peer solvers on the exact-score VP benchmark: diffusers' DPM-Solver++ (2M, 3M) and UniPC against the
library's default ``sample(method="gddim", nfe=N)`` (``bench-solvers --peers``; optional, needs
``pip install -e '.[peers]'``: diffusers and torch, imported only when this runs).

The problem is :mod:`bench_solvers`'s: the 8-Gaussian ring (variance 0.01), VP with the family's default
beta_min = 0.1, beta_max = 20, from T = 1 to t_end = 1e-3, the same prior draws, and the error is the mean
L2 distance of the data coordinate to the same float64 Dopri5 reference (``bench_solvers.reference_x64``).

VP in diffusers' terms: alpha_bar(t) = m_t^2 = exp(-B(t)), B(t) = beta_min t + (beta_max - beta_min) t^2 / 2, and
sigma = sqrt((1 - alpha_bar) / alpha_bar) (the noise-to-signal ratio). The scheduler's discrete table has
``N_TRAIN`` entries i <-> t_i = t_end + i (T - t_end) / (N_TRAIN - 1), so its first step starts at T and,
with ``final_sigmas_type="sigma_min"``, its last step ends at t_end. The table is set in float64 (diffusers'
float32 cumulative product of betas would misplace sigma_min by tens of per cent). The network is the exact
eps of the mixture, in float64 numpy (closed form, independent of :mod:`diffusion_jax.exact`),

    eps(x, t) = -sigma_t score = sigma_t sum_k r_k(x) (x - alpha_t mu_k) / (alpha_t^2 s^2 + sigma_t^2),

evaluated at the continuous time of the solver's own sigma (so the integer timesteps that diffusers rounds to do
not enter). Each peer is run with three spacings of its noise levels (uniform in t; Karras, rho = 7; uniform
log-SNR), set on the scheduler directly (:func:`run_peer`), and the best one per NFE is the peer's figure.
"""
from __future__ import annotations

import os
import time

import numpy as np

N_TRAIN = 1000
PEERS = {"dpm++2m": ("DPMSolverMultistepScheduler", dict(solver_order=2, algorithm_type="dpmsolver++")),
         "dpm++3m": ("DPMSolverMultistepScheduler", dict(solver_order=3, algorithm_type="dpmsolver++")),
         "unipc": ("UniPCMultistepScheduler", dict(solver_order=2, solver_type="bh2")),
         "unipc3": ("UniPCMultistepScheduler", dict(solver_order=3, solver_type="bh2"))}
SPACINGS = ("uniform_t", "karras", "logsnr")
PEER_NFES = (5, 10, 20, 50)


def _import_peers():
    try:
        import diffusers
        import torch
    except ImportError as e:
        raise ImportError("bench-solvers --peers needs diffusers and torch, which the library does not depend on: "
                          "pip install -e '.[peers]'") from e
    return diffusers, torch


def vp_schedule(beta_min: float, beta_max: float, t_end: float, T: float = 1.0):
    """(B(t), its inverse from sigma, the float64 alpha_bar table of N_TRAIN entries)."""
    d = beta_max - beta_min

    def big_b(t):
        return beta_min * t + 0.5 * d * t * t

    def t_of_sigma(sig):
        b = np.log1p(np.asarray(sig, np.float64) ** 2)                  # alpha_bar = 1 / (1 + sigma^2)
        return (-beta_min + np.sqrt(beta_min ** 2 + 2 * d * b)) / d

    ts = t_end + np.arange(N_TRAIN) * (T - t_end) / (N_TRAIN - 1)
    return big_b, t_of_sigma, np.exp(-big_b(ts))


def mixture_eps(x: np.ndarray, t: float, big_b, means: np.ndarray, var: float) -> np.ndarray:
    """Exact eps of an equal-weight isotropic Gaussian mixture under VP, float64 (x: (n, 2))."""
    a = np.exp(-0.5 * big_b(t))
    s2 = -np.expm1(-big_b(t))
    v = a * a * var + s2
    diff = x[:, None, :] - a * means[None]                               # (n, K, 2)
    logw = -0.5 * np.sum(diff ** 2, -1) / v
    logw -= logw.max(axis=1, keepdims=True)
    r = np.exp(logw)
    r /= r.sum(axis=1, keepdims=True)
    return np.sqrt(s2) * np.einsum("nk,nkd->nd", r, diff) / v


def peer_sigmas(spacing: str, nfe: int, big_b, t_end: float, T: float = 1.0) -> np.ndarray:
    """nfe + 1 decreasing noise levels sigma = sqrt(e^B - 1) from T to t_end: uniform in t, Karras (rho = 7), or
    uniform in log sigma (= uniform log-SNR)."""
    sig = lambda t: np.sqrt(np.expm1(big_b(t)))
    s_max, s_min = sig(T), sig(t_end)
    k = np.arange(nfe + 1) / nfe
    if spacing == "uniform_t":
        return sig(T + k * (t_end - T))
    if spacing == "karras":
        return (s_max ** (1 / 7) + k * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7
    if spacing == "logsnr":
        return np.exp(np.log(s_max) + k * (np.log(s_min) - np.log(s_max)))
    raise ValueError(f"unknown spacing {spacing!r}; choose one of {list(SPACINGS)}")


def run_peer(name: str, spacing: str, nfe: int, x_t: np.ndarray, beta_min: float, beta_max: float, t_end: float,
             means: np.ndarray, var: float) -> np.ndarray:
    """One diffusers run from x_T (n, 2), float64 states and model outputs; returns x at t_end.

    The scheduler's noise levels are set to :func:`peer_sigmas` (nfe + 1 values, T -> t_end: exactly nfe steps
    of the solver ending at t_end). Diffusers' own Karras / exponential spacings with ``final_sigmas_type=
    "sigma_min"`` end with a zero-length step (sigma_min twice), which wastes one evaluation and makes the 3M
    update divide by zero; ``"zero"`` would end on the denoiser at sigma_min instead of the ODE state at t_end.
    """
    diffusers, torch = _import_peers()
    cls_name, kw = PEERS[name]
    big_b, t_of_sigma, abar = vp_schedule(beta_min, beta_max, t_end)
    betas = 1.0 - abar / np.concatenate([[1.0], abar[:-1]])
    sched = getattr(diffusers, cls_name)(num_train_timesteps=N_TRAIN, trained_betas=betas, prediction_type="epsilon",
                                         lower_order_final=True, final_sigmas_type="sigma_min", **kw)
    # float64 table (diffusers builds it with a float32 cumulative product)
    sched.alphas_cumprod = torch.tensor(abar, dtype=torch.float64)
    sched.alpha_t = torch.sqrt(sched.alphas_cumprod)
    sched.sigma_t = torch.sqrt(1 - sched.alphas_cumprod)
    sched.lambda_t = torch.log(sched.alpha_t) - torch.log(sched.sigma_t)
    sched.set_timesteps(nfe)                                   # resets the solver's history
    sig = peer_sigmas(spacing, nfe, big_b, t_end)
    idx = np.rint((t_of_sigma(sig[:-1]) - t_end) / (1.0 - t_end) * (N_TRAIN - 1)).astype(np.int64)
    for j in range(nfe - 2, -1, -1):                           # strictly decreasing labels (bookkeeping only)
        idx[j] = max(idx[j], idx[j + 1] + 1)
    sched.sigmas = torch.tensor(sig, dtype=torch.float32)
    sched.timesteps = torch.tensor(idx, dtype=torch.int64)
    sched.num_inference_steps = nfe
    x = torch.tensor(x_t, dtype=torch.float64)
    for i, step_t in enumerate(sched.timesteps):
        t_cont = float(t_of_sigma(float(sched.sigmas[i])))
        eps = torch.tensor(mixture_eps(x.numpy(), t_cont, big_b, means, var), dtype=torch.float64)
        x = sched.step(eps, step_t, x).prev_sample
    return x.numpy()


def run(out_dir: str, nfes=PEER_NFES, n_samples: int = 256, t_end: float = 1e-3, seed: int = 0) -> list[dict]:
    """The peer table (markdown + csv under ``out_dir``): per NFE the library default's error, each peer's best
    error over the spacings and the ratio default / peer (< 1: the library is more accurate)."""
    _import_peers()
    import jax

    from diffusion_jax import exact, sdes
    from diffusion_jax.apps.bench_solvers import RING, reference_x64
    from diffusion_jax.exact import exact_eps_fn
    from diffusion_jax.samplers import prior_init, sample

    os.makedirs(out_dir, exist_ok=True)
    sde = sdes.make("vp")
    beta_min, beta_max = float(sde.params["beta_min"]), float(sde.params["beta_max"])
    if sde.T != 1.0:
        raise ValueError(f"the peer run assumes VP with T = 1, got {sde.T}")
    var = RING["variance"]
    mix = exact.ring_of_gaussians(**RING)
    means = np.asarray(mix.means, np.float64)
    fn = exact_eps_fn(sde, mix)
    u0 = prior_init(sde, jax.random.PRNGKey(seed), n_samples, (2,))
    ref = reference_x64(sde, RING, u0, t_end)
    x_t = np.asarray(u0[..., 0], np.float64)

    def err(x):
        return float(np.mean(np.linalg.norm(np.asarray(x, np.float64) - ref, axis=1)))

    rows = []
    for nfe in nfes:
        u, info = sample(sde, fn, u0, method="gddim", nfe=nfe, t_end=t_end)
        row = dict(nfe=nfe, default=err(u[..., 0]), default_config=str((info.config or {}).get("predict", "")))
        u, _ = sample(sde, fn, u0, method="gddim", nfe=nfe, t_end=t_end, predict="eps")
        row["eps_form"] = err(u[..., 0])                 # order 1, uniform grid: the former default
        for name in PEERS:
            best = None
            for spacing in SPACINGS:
                start = time.perf_counter()
                e = err(run_peer(name, spacing, nfe, x_t, beta_min, beta_max, t_end, means, var))
                row[f"{name}/{spacing}"] = e
                print(f"  nfe={nfe:3d} {name:8s} {spacing:9s} L2 to ref {e:.3e}  ({time.perf_counter() - start:.1f} s)",
                      flush=True)
                if best is None or e < best[0]:
                    best = (e, spacing)
            row[name], row[f"{name}_spacing"] = best
        print(f"nfe={nfe}: default {row['default']:.3e}; " +
              ", ".join(f"{p} {row[p]:.3e} ({row[p + '_spacing']})" for p in PEERS), flush=True)
        rows.append(row)
    lines = ["# Peers on the exact-score VP ring (bench-solvers --peers)", "",
             f"{n_samples} prior draws (seed {seed}) shared by every solver, T = 1 -> t_end = {t_end}, mean L2 of x "
             "to the Dopri5 reference. Peers: diffusers, float64 states, exact eps in float64; the best of three "
             "spacings (uniform t, Karras, uniform log-SNR) per NFE. Ratio = library default / peer (< 1: the "
             "library is more accurate).", "",
             "Library default: `sample(method=\"gddim\", nfe=N)` (the denoiser form, tuned under its gain bound); "
             "eps form: the same with `predict=\"eps\"` (order 1, uniform grid).", "",
             "| NFE | library default | eps form | " + " | ".join(PEERS) + " | " + " | ".join(f"default / {p}" for p in PEERS)
             + " |", "|---|---|---|" + "---|" * (2 * len(PEERS))]
    for r in rows:
        lines.append(f"| {r['nfe']} | {r['default']:.2e} ({r['default_config']}) | {r['eps_form']:.2e} | "
                     + " | ".join(f"{r[p]:.2e} ({r[p + '_spacing']})" for p in PEERS) + " | "
                     + " | ".join(f"{r['default'] / r[p]:.2f}" for p in PEERS) + " |")
    with open(os.path.join(out_dir, "bench_peers.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    import csv
    with open(os.path.join(out_dir, "bench_peers.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("\n".join(lines))
    return rows
