r"""Analysis report of a trained run: learned versus optimal sampling from the same noise (arXiv 2305.19947).

``run(workdir, out_dir)`` loads a trained run (toy 2-D or image data, any family), draws ``n`` initial states
u_T from the prior and integrates the probability-flow ODE (``method``, ``nfe``) twice from them: once with the
learned model and once with the optimal denoiser D* of a finite training set (:func:`deviation.empirical_denoiser_fn`,
streamed in chunks). Everything is measured in the data coordinate x = u[..., 0] and on the denoiser output
D(u_t, t) = E[x_0 | u_t], so families with k >= 2 are treated like k = 1. It writes PNG figures, ``summary.json``,
``summary.md`` and ``trajectories.npz`` (the raw arrays, for re-analysis) to ``out_dir``.

What is measured (all from :mod:`.geometry` and :mod:`.deviation`):

* geometry: the chord deviation (distance of each point from the straight line through the trajectory's two
  end points) of the sampling trajectory x_t and of the denoising trajectory D(u_t, t), for both models; the
  summary is the per-example maximum over time, absolute and relative to the chord length;
* score deviation: the four distances of :func:`deviation.score_deviation` (sampling, denoising, learned-path
  and optimal-path deviation) at each grid time, averaged over the batch, then over the grid times of two
  noise regions. **Split rule**: a grid time is *large-noise* when its noise level sigma(t) =
  sqrt(Sigma_t[x, x]) / m_t[x] (for a modal family, that of its unblurred zero-frequency mode,
  :func:`samplers.grids.noise_level`) exceeds sigma_data, the standard deviation of the training set (all
  coordinates pooled), and *small-noise* otherwise. A denoiser error delta is an eps error of about
  delta / sigma(t) (D = (u - K eps) / m), so the two deviations are also reported divided by sigma(t): the same
  error on the network's own scale. At large noise that removes the 1 / m_t amplification; as sigma -> 0 it
  grows for any model that does not snap to the nearest training point as D* does (generalisation);
* memorisation: the distance of each final sample (the denoiser output at t_min, i.e. a final denoising step)
  to its nearest training point and the ratio d_1 / d_2 of nearest to second-nearest, for the learned
  samples, for the optimal samples (copies of training points: d_1 = 0) and for held-out data (the reference
  a model that generalises should match); plus the sliced Wasserstein distance of each sample set to
  held-out data.

Families: every one, modal ones (blurring diffusion) included: trajectories, denoiser outputs and distances
are in pixel space, and the optimal denoiser of a modal family weighs the training points with per-mode
bandwidths (:func:`exact.empirical_denoiser`). The report has no mean-shift part (that view,
:mod:`.meanshift`, holds only for one scalar law per data dimension and rejects modal families).

Which training set: for image data the run's training split (first ``data_limit`` examples); for toy 2-D data,
where the model sees a fresh stream of samples, the first ``data_limit`` points of that very stream
(the run's ``ToyIterator``), and as held-out data the evaluation draw of :func:`data.load_split`.
:func:`analyze` is the same report on arrays and functions (no workdir), e.g. to test it with a known model.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable

import jax
import numpy as np

from diffusion_jax.analysis.deviation import nearest_neighbors, score_deviation
from diffusion_jax.analysis.geometry import chord_deviation, flatten_trajectory
from diffusion_jax.analysis.plots import plot_curves, plot_trajectories_1d
from diffusion_jax.data import to_image_space
from diffusion_jax.param import SquareRoot
from diffusion_jax.samplers import METHODS, STOCHASTIC, prior_init
from diffusion_jax.sdes.base import Family

Array = Any

__all__ = ["run", "analyze", "DISTANCES", "RATIO_THRESHOLD"]

# the distances of deviation.score_deviation summarised by region, in report order
DISTANCES = ("sampling", "denoising", "learned_deviation", "optimal_deviation", "state_distance")
RATIO_THRESHOLD = 1.0 / 3.0            # d1 / d2 below this: the sample is (nearly) a copy of a training point
_DEFAULT_TOY_LIMIT = 4096


# ------------------------------------------------------------------ small helpers
def _finite_or_none(v: float) -> float | None:
    """JSON has no NaN: undefined numbers (e.g. an empty noise region) are written as null."""
    v = float(v)
    return v if math.isfinite(v) else None


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (float, np.floating)):
        return _finite_or_none(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return f"{float(v) + 0.0:.{digits}g}"          # + 0.0: no "-0"


def _geometry_summary(traj: np.ndarray) -> dict[str, Any]:
    """Chord deviation of trajectories (N+1, batch, *data): per-time batch mean and per-example maxima."""
    x = flatten_trajectory(traj)
    dev = chord_deviation(x)                                            # (N+1, batch)
    chord = np.linalg.norm(x[-1] - x[0], axis=-1)                      # (batch,)
    length = np.sum(np.linalg.norm(np.diff(x, axis=0), axis=-1), axis=0)
    peak = dev.max(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = peak / chord
        excess = length / chord
    return dict(max_chord_deviation=float(np.mean(peak)),
                max_chord_deviation_relative=float(np.nanmean(rel)),
                chord_length=float(np.mean(chord)), path_length=float(np.mean(length)),
                length_over_chord=float(np.nanmean(excess)),
                first_example_chord_deviation=dev[:, 0],
                curve_mean=dev.mean(axis=1))


def _region_means(curve: np.ndarray, large: np.ndarray) -> dict[str, float]:
    """Mean of a per-time curve over the large- and small-noise grid times (NaN for an empty region)."""
    def mean(mask):
        return float(np.mean(curve[mask])) if np.any(mask) else float("nan")
    return dict(large_noise=mean(large), small_noise=mean(~large), final=float(curve[-1]),
                max=float(np.max(curve)))


def _nn_summary(nn: dict[str, np.ndarray]) -> dict[str, float]:
    d1 = nn["distance"][:, 0]
    out = dict(nn_distance_mean=float(np.mean(d1)), nn_distance_median=float(np.median(d1)),
               nn_distance_min=float(np.min(d1)))
    if "ratio" in nn:
        ratio = nn["ratio"]
        out["ratio_median"] = float(np.nanmedian(ratio))
        out["fraction_ratio_below_1_3"] = float(np.mean(ratio < RATIO_THRESHOLD))
    return out


def _sliced_w2(a: np.ndarray, b: np.ndarray, n_proj: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two equal-size point clouds (exact 1-D transport per direction)."""
    from diffusion_jax.evaluation.distances import sliced_wasserstein
    m = min(len(a), len(b))
    return sliced_wasserstein(a[:m].reshape(m, -1), b[:m].reshape(m, -1), n_proj, seed)


# ------------------------------------------------------------------ figures
def _figure():
    from matplotlib.figure import Figure
    return Figure(figsize=(6.5, 4.2))


def _save(fig, path: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    return path


def _plot_score_deviation(path: str, sigma: np.ndarray, result: dict, split: float, title: str) -> str:
    """The batch-mean distances versus sigma (log-log, 10-90% band), the region boundary marked."""
    import warnings
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for key in DISTANCES[:4]:
        v = np.asarray(result[key], np.float64)
        v = np.where(v > 0, v, np.nan)           # exact zeros (e.g. the shared start) have no log
        with warnings.catch_warnings():      # all-NaN rows (a shared start) are expected
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(v, axis=1)
            lo, hi = np.nanpercentile(v, [10, 90], axis=1)
        line, = ax.plot(sigma, mean, lw=1.5, label=key)
        ax.fill_between(sigma, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
    ax.axvline(split, c="k", ls=":", lw=1, label=f"sigma_data = {split:.3g}")
    ax.set(xscale="log", yscale="log", xlabel="noise level sigma(t)", ylabel="distance", title=title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _plot_2d(path: str, data: np.ndarray, runs: dict[str, tuple[np.ndarray, np.ndarray]], title: str,
             max_paths: int = 12) -> str:
    """Side-by-side 2-D sampling (solid) and denoising (dashed) trajectories over the training points.

    The view is the data's bounding box (with a margin): denoiser outputs at large noise can lie far outside,
    and a view fitted to them would shrink the data to a dot.
    """
    from matplotlib.figure import Figure
    fig = Figure(figsize=(5.0 * len(runs), 5.0))
    lo, hi = data.min(axis=0), data.max(axis=0)
    pad = 0.5 * (hi - lo).max()
    for i, (name, (x, d)) in enumerate(runs.items()):
        ax = fig.add_subplot(1, len(runs), i + 1)
        ax.scatter(data[:, 0], data[:, 1], s=2, c="0.75", zorder=0, label="training data")
        for b in range(min(max_paths, x.shape[1])):
            line, = ax.plot(x[:, b, 0], x[:, b, 1], lw=1.0, alpha=0.9)
            ax.plot(d[:, b, 0], d[:, b, 1], "--", lw=0.7, c=line.get_color(), alpha=0.7)
            ax.plot(x[-1, b, 0], x[-1, b, 1], "o", ms=4, c=line.get_color())
        ax.set(xlim=(lo[0] - pad, hi[0] + pad), ylim=(lo[1] - pad, hi[1] + pad),
               title=f"{name}: sampling (solid), denoising (dashed)")
        ax.set_aspect("equal")
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def _plot_memorisation(path: str, dists: dict[str, np.ndarray]) -> str:
    """Histograms of the nearest-training-point distance for each sample set."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    hi = max(float(np.max(d)) for d in dists.values())
    bins = np.linspace(0.0, hi * 1.05 + 1e-12, 40)
    for name, d in dists.items():
        ax.hist(d, bins=bins, histtype="step", lw=1.5, density=True, label=f"{name} (median {np.median(d):.3g})")
    ax.set(xlabel="distance to nearest training point", ylabel="density", title="memorisation")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _plot_image_samples(path: str, rows: dict[str, np.ndarray], n_cols: int = 16) -> str:
    """One row of images (H, W, C) in [-1, 1] per named set (learned, optimal, nearest training points)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(n_cols * 0.6 + 0.9, len(rows) * 0.65 + 0.1))
    fig.subplots_adjust(left=0.9 / (n_cols * 0.6 + 0.9), right=0.995, top=0.97, bottom=0.03, wspace=0.08,
                        hspace=0.12)
    for r, (name, imgs) in enumerate(rows.items()):
        for c in range(min(n_cols, len(imgs))):
            ax = fig.add_subplot(len(rows), n_cols, r * n_cols + c + 1)
            img = to_image_space(imgs[c])
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=6, rotation=0, ha="right", va="center")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, format="png")
    return path


def _figures(out_dir: str, sde: Family, method: str, nfe: int, data_shape: tuple, train_data: np.ndarray,
             res: dict, sigma: np.ndarray, sigma_data: float, nn: dict, samples_l: np.ndarray,
             samples_o: np.ndarray) -> list[str]:
    """All PNG figures of the report; returns their paths."""
    files = []
    x_l, x_o = res["traj_learned"][..., 0], res["traj_optimal"][..., 0]
    title = f"{sde.name} (k={sde.order}), {method} nfe={nfe}"
    if data_shape == (2,):
        files.append(_plot_2d(os.path.join(out_dir, "trajectories.png"), train_data,
                              {"learned": (x_l, res["D_learned"]), "optimal": (x_o, res["D_optimal"])}, title))
    else:
        nearest = train_data[nn["learned"]["index"][:, 0]]
        files.append(_plot_image_samples(os.path.join(out_dir, "samples.png"),
                                         {"learned": samples_l, "nearest train": nearest, "optimal": samples_o}))
    for name, x, d in (("learned", x_l, res["D_learned"]), ("optimal", x_o, res["D_optimal"])):
        files.append(plot_trajectories_1d(os.path.join(out_dir, f"projection_{name}.png"), sigma, x, d,
                                          max_paths=16, xlabel="noise level sigma(t)",
                                          title=f"{name}: sampling (solid) / denoising (dashed) on the chord"))
    files.append(plot_curves(os.path.join(out_dir, "chord_deviation.png"), sigma,
                             {"learned sampling": chord_deviation(x_l), "learned denoising":
                              chord_deviation(res["D_learned"]), "optimal sampling": chord_deviation(x_o),
                              "optimal denoising": chord_deviation(res["D_optimal"])},
                             xlabel="noise level sigma(t)", ylabel="distance from the chord",
                             title=f"deviation from the chord: {title}"))
    files.append(_plot_score_deviation(os.path.join(out_dir, "score_deviation.png"), sigma, res, sigma_data,
                                       f"learned vs optimal: {title}"))
    files.append(_plot_memorisation(os.path.join(out_dir, "memorisation.png"),
                                    {k: v["distance"][:, 0] for k, v in nn.items()}))
    return files


# ------------------------------------------------------------------ the report on arrays
def analyze(sde: Family, learned_fn: Callable, train_data: Array, heldout: Array, out_dir: str, *,
            output: str = "eps", K: str | SquareRoot = "R", n: int = 64, nfe: int | None = 50, method: str = "gddim",
            seed: int = 0, chunk: int = 1024, meta: dict | None = None,
            sampler_kwargs: dict | None = None, plots: bool = True, learned_params: Any = None) -> dict[str, Any]:
    """The report for a model ``learned_fn`` (returning ``output`` w.r.t. ``K``) of data like ``train_data``.

    ``train_data`` (n_train, *data) defines the optimal denoiser and the memorisation reference; ``heldout``
    (m, *data) is data the model did not see. Returns the summary dict that is also written to
    ``out_dir/summary.json`` (``summary.md``, ``trajectories.npz`` and, with ``plots``, the PNGs alongside).
    """
    start = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; choose one of {', '.join(METHODS)}")
    train_data = np.asarray(train_data, np.float32)
    heldout = np.asarray(heldout, np.float32)
    if train_data.ndim < 2 or heldout.shape[1:] != train_data.shape[1:]:
        raise ValueError(f"train_data (n, *data) and heldout (m, *data) must share the example shape, got "
                         f"{train_data.shape} and {heldout.shape}")
    if len(train_data) < 2:
        raise ValueError("need at least 2 training points (nearest and second-nearest neighbour)")
    if not (isinstance(n, (int, np.integer)) and n >= 1):
        raise ValueError(f"n must be a positive integer, got {n!r}")
    os.makedirs(out_dir, exist_ok=True)
    data_shape = tuple(train_data.shape[1:])
    kwargs = dict(sampler_kwargs or {})
    if method in STOCHASTIC or kwargs.get("lam", 0.0) or method == "sscs":
        kwargs.setdefault("key", jax.random.PRNGKey(seed + 1))    # the same noise for both runs
    u_init = prior_init(sde, jax.random.PRNGKey(seed), int(n), data_shape)

    res = score_deviation(sde, learned_fn, train_data, u_init, method=method, nfe=nfe, output=output, K=K,
                          chunk=chunk, learned_params=learned_params, **kwargs)
    ts, sigma = np.asarray(res["ts"]), np.asarray(res["sigma"])
    sigma_data = float(np.std(train_data))
    large = sigma > sigma_data

    # geometry in the data coordinate x = u[..., 0] and on the denoiser output
    x_l, x_o = res["traj_learned"][..., 0], res["traj_optimal"][..., 0]
    geo = {"learned": {"sampling": _geometry_summary(x_l), "denoising": _geometry_summary(res["D_learned"])},
           "optimal": {"sampling": _geometry_summary(x_o), "denoising": _geometry_summary(res["D_optimal"])}}

    # score deviation: batch mean per time, then region means
    curves = {k: np.asarray(res[k]).mean(axis=1) for k in DISTANCES}
    # A denoiser error delta is an eps error of about delta / sigma(t) (D = (u - K eps) / m): the same error
    # in the network's own units, free of the 1 / m_t amplification at large noise.
    for k in ("learned_deviation", "optimal_deviation"):
        curves[f"{k}_over_sigma"] = (np.asarray(res[k]) / sigma[:, None]).mean(axis=1)
    regions = {k: _region_means(v, large) for k, v in curves.items()}

    # memorisation: final samples = denoiser output at t_min (a final denoising step)
    samples_l, samples_o = np.asarray(res["D_learned"][-1]), np.asarray(res["D_optimal"][-1])
    # one call (one compilation) for the three query sets
    queries = np.concatenate([samples_l, samples_o, heldout]).astype(np.float32)
    both = nearest_neighbors(queries, train_data, 2, chunk)
    cuts = np.cumsum([0, len(samples_l), len(samples_o), len(heldout)])
    nn = {name: {k: v[cuts[i]:cuts[i + 1]] for k, v in both.items()}
          for i, name in enumerate(("learned", "optimal", "heldout"))}
    # An explicit solver can blow up at small t for k >= 2 (stiff PF-ODE), often in the auxiliary coordinates
    # only: flag a final state beyond 10x the scale of the data and of the prior rather than report noise.
    scale = max(float(np.max(np.abs(train_data))), float(np.sqrt(np.max(np.diag(sde.prior_covariance)))))
    diverged = {name: bool(not np.all(np.isfinite(tr)) or np.max(np.abs(tr[-1])) > 10.0 * scale)
                for name, tr in (("learned", res["traj_learned"]), ("optimal", res["traj_optimal"]))}
    memo = {k: _nn_summary(v) for k, v in nn.items()}
    sw = {"learned": _sliced_w2(samples_l, heldout), "optimal": _sliced_w2(samples_o, heldout),
          # the value a perfect sampler would get at this sample size: training points against held-out data
          "train_subset": _sliced_w2(train_data[: min(len(samples_l), len(train_data))], heldout)}

    # figures
    files = []
    if plots:
        files += _figures(out_dir, sde, method, nfe, data_shape, train_data, res, sigma, sigma_data, nn,
                          samples_l, samples_o)
    np.savez_compressed(os.path.join(out_dir, "trajectories.npz"), ts=ts, sigma=sigma,
                        x_learned=x_l, x_optimal=x_o, D_learned=res["D_learned"], D_optimal=res["D_optimal"],
                        u_init=np.asarray(u_init), **{k: np.asarray(res[k]) for k in DISTANCES})
    files.append(os.path.join(out_dir, "trajectories.npz"))

    summary = dict(
        run=dict(meta or {}, family=sde.name, k=sde.order, family_params=dict(sde.params),
                 data_shape=list(data_shape), dim=int(np.prod(data_shape))),
        settings=dict(n=int(n), nfe=None if nfe is None else int(nfe), method=method, seed=int(seed),
                      grid_points=int(len(ts)), t_start=float(ts[0]), t_end=float(ts[-1]), nfe_used=res["nfe"],
                      nfe_analysis=res["nfe_analysis"], n_train=int(len(train_data)), n_heldout=int(len(heldout)),
                      sampler_kwargs={k: v for k, v in kwargs.items() if k != "key"}, diverged=diverged),
        split=dict(rule="large-noise: sigma(t) > sigma_data; small-noise: sigma(t) <= sigma_data; "
                        "sigma(t) = sqrt(Sigma_t[x,x]) / m_t[x]" + (" of the unblurred (zero-frequency) mode"
                                                                    if sde.mode_ndim else "") +
                        ", sigma_data = std of the training set "
                        "(all coordinates pooled); region value = mean over its grid times of the batch mean",
                   sigma_data=sigma_data, n_large=int(large.sum()), n_small=int((~large).sum())),
        score_deviation=regions,
        geometry={m: {w: {k: v for k, v in g.items() if k not in ("curve_mean", "first_example_chord_deviation")}
                      for w, g in d.items()} for m, d in geo.items()},
        memorisation=memo, sliced_wasserstein_to_heldout=sw,
        curves=dict(t=ts, sigma=sigma, **curves,
                    **{f"chord_deviation_{m}_{w}": geo[m][w]["curve_mean"] for m in geo for w in geo[m]},
                    first_example_chord_deviation_learned_sampling=geo["learned"]["sampling"][
                        "first_example_chord_deviation"]),
        files=sorted(os.path.basename(f) for f in files + ["summary.json", "summary.md"]),
    )
    summary["seconds"] = time.perf_counter() - start
    summary = _jsonable(summary)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(_markdown(summary))
    return summary


def _markdown(s: dict) -> str:
    """The human-readable summary: settings, the split rule, and three tables."""
    r, st, sp = s["run"], s["settings"], s["split"]
    bad = [k for k, v in st["diverged"].items() if v]
    lines = [f"# Trajectory report: {r['family']} (k={r['k']})", ""]
    if r.get("workdir"):
        lines.append(f"Run `{r['workdir']}` (step {r.get('step', '?')}, params: {r.get('params', '?')}), "
                     f"data {r.get('dataset', '?')} {tuple(r['data_shape'])}.")
    lines += [f"{st['n']} initial states from the prior, {st['method']} with nfe={st['nfe']} "
              f"(used: learned {st['nfe_used']['learned']}, optimal {st['nfe_used']['optimal']}), "
              f"{st['grid_points']} grid times t = {_fmt(st['t_start'])} -> {_fmt(st['t_end'])}. "
              f"Optimal denoiser and memorisation reference: {st['n_train']} training points; "
              f"held-out: {st['n_heldout']}.", "",
              *([f"**Warning: the {' and '.join(bad)} run{'s' if len(bad) > 1 else ''} diverged** "
                 f"(final state beyond 10x the scale of the data and the prior, or non-finite), so the "
                 f"numbers below describe a failed run. Explicit solvers (euler, heun, ...) are unstable at "
                 f"small t for k >= 2 families at low nfe: use method='gddim' or more steps; if gddim "
                 f"diverges too, the model is undertrained.", ""]
                if bad else []),
              f"**Noise regions.** {sp['rule']}. sigma_data = {_fmt(sp['sigma_data'])}: "
              f"{sp['n_large']} large-noise and {sp['n_small']} small-noise grid times.", "",
              "## Score deviation (Euclidean distances over all data dimensions, mean over examples)", "",
              "| distance | large noise | small noise | at t_min | max over t |", "|---|---|---|---|---|"]
    desc = {"sampling": "sampling ‖x^θ_t − x*_t‖", "denoising": "denoising ‖D_θ(u^θ_t) − D*(u*_t)‖",
            "learned_deviation": "learned path ‖D_θ(u^θ_t) − D*(u^θ_t)‖",
            "optimal_deviation": "optimal path ‖D_θ(u*_t) − D*(u*_t)‖",
            "state_distance": "full state ‖u^θ_t − u*_t‖",
            "learned_deviation_over_sigma": "learned path ‖D_θ − D*‖ / σ(t) (eps scale)",
            "optimal_deviation_over_sigma": "optimal path ‖D_θ − D*‖ / σ(t) (eps scale)"}
    for k, v in s["score_deviation"].items():
        lines.append(f"| {desc.get(k, k)} | {_fmt(v['large_noise'])} | {_fmt(v['small_noise'])} | "
                     f"{_fmt(v['final'])} | {_fmt(v['max'])} |")
    lines += ["", "## Geometry (data coordinate x = u[..., 0] and denoiser output; mean over examples)", "",
              "| model | trajectory | max chord deviation | relative to chord | chord length | path length / chord |",
              "|---|---|---|---|---|---|"]
    for m, d in s["geometry"].items():
        for w, g in d.items():
            lines.append(f"| {m} | {w} | {_fmt(g['max_chord_deviation'])} | "
                         f"{_fmt(g['max_chord_deviation_relative'])} | {_fmt(g['chord_length'])} | "
                         f"{_fmt(g['length_over_chord'])} |")
    lines += ["", "## Memorisation (distance to the nearest training point; ratio = d1/d2)", "",
              "| samples | mean d1 | median d1 | min d1 | median ratio | ratio < 1/3 | sliced W2 to held-out |",
              "|---|---|---|---|---|---|---|"]
    sw = s["sliced_wasserstein_to_heldout"]
    for k, v in s["memorisation"].items():
        lines.append(f"| {k} | {_fmt(v['nn_distance_mean'])} | {_fmt(v['nn_distance_median'])} | "
                     f"{_fmt(v['nn_distance_min'])} | {_fmt(v.get('ratio_median'))} | "
                     f"{_fmt(v.get('fraction_ratio_below_1_3'))} | "
                     f"{_fmt(sw.get(k, sw['train_subset'] if k == 'heldout' else None))} |")
    lines += ["", "Held-out row, sliced W2 column: training points against held-out data at the same sample "
              "size (the floor a perfect sampler reaches). Optimal samples copy training points (d1 = 0); "
              "learned samples whose d1 matches held-out data's generalise.", "",
              "Eps-scale rows: a denoiser error delta is an eps error of about delta / sigma(t). At small sigma "
              "the optimal denoiser of a finite set snaps to the nearest training point while a network that "
              "generalises does not, so that ratio grows as sigma -> 0: memorisation versus generalisation, "
              "not a failure of the network.", "",
              f"Figures: {', '.join(f for f in s['files'] if f.endswith('.png'))}. "
              f"Report time {_fmt(s['seconds'], 3)} s.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------ the report on a workdir
def _select_params(state: Any, ema: str | float | None) -> tuple[Any, str]:
    """The parameters to analyse: an EMA copy (default: the slowest rate) or the raw parameters."""
    if ema in ("raw", "params", "none"):
        return state.params, "raw"
    if not state.ema:
        return state.params, "raw"
    from diffusion_jax.training.state import pick_ema
    key, params = pick_ema(state, ema)
    return params, f"ema {key}"


def _toy_training_points(config: Any, limit: int) -> np.ndarray:
    """The first ``limit`` points of the run's own training stream (the batches it trained on first)."""
    from diffusion_jax.data import ToyIterator
    batch = int(config.training.batch_size)
    it = ToyIterator(config.data.toy_name, batch, int(config.seed))
    seen = int(config.training.num_steps) * batch
    limit = min(limit, seen)
    out = []
    while sum(len(b) for b in out) < limit:
        out.append(next(it))
    return np.concatenate(out)[:limit]


def run(workdir: str, out_dir: str, *, n: int = 64, nfe: int = 50, method: str = "gddim",
        ema: str | float | None = None, data_limit: int | None = None, heldout_limit: int | None = None,
        seed: int = 0, chunk: int = 1024, **sampler_kwargs: Any) -> dict[str, Any]:
    """Report on the trained run in ``workdir`` (see the module docstring); returns the summary dict.

    ``ema``: None = the EMA copy with the largest rate, a rate (e.g. 0.999), or "raw" for the raw params.
    ``data_limit``: training points for the optimal denoiser (default: the whole split for images, 4096
    points of the training stream for toy data). ``heldout_limit``: held-out points (default: the whole
    evaluation split for images, max(n, 1000) for toy data). ``sampler_kwargs`` go to
    :func:`samplers.sample` (e.g. ``order=2`` for gddim, ``grid="logsnr"``).
    """
    from diffusion_jax.data import load_split
    from diffusion_jax.training import load_run

    exp, state = load_run(workdir)
    config = exp.config
    params, which = _select_params(state, ema)
    if config.data.dataset == "toy2d":
        train_data = _toy_training_points(config, data_limit or _DEFAULT_TOY_LIMIT)
        heldout = load_split(config, config.data.eval_split, heldout_limit or max(n, 1000))
    else:
        train_data = load_split(config, config.data.split, data_limit)
        heldout = load_split(config, config.data.eval_split, heldout_limit)
    meta = dict(workdir=os.path.abspath(workdir), step=int(np.asarray(state.step)), params=which,
                dataset=config.data.dataset + (f"/{config.data.toy_name}" if config.data.dataset == "toy2d" else ""))
    return analyze(exp.sde, exp.apply, train_data, heldout, out_dir, output="eps", K=exp.sqrt, n=n, learned_params=params,
                   nfe=nfe, method=method, seed=seed, chunk=chunk, meta=meta, sampler_kwargs=sampler_kwargs)
