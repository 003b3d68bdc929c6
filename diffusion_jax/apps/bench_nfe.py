r"""Sample quality versus NFE for a trained run: ``python -m diffusion_jax bench-nfe --workdir RUN``.

For every sampler and every NFE budget the run's EMA network draws ``n_samples`` images from the
*same* initial noise (drawn once from ``seed``), and a metric compares them with the statistics of the
data set's training split:

* ``fd-pixels``: Frechet distance between Gaussian fits of the flattened pixels in [0, 1]
  (:data:`diffusion_jax.evaluation.PIXELS`); not FID, and not comparable with FID numbers;
* ``kid-pixels``: KID (cubic polynomial kernel) on the same pixels, mean over random subsets;
* ``fid``: the Frechet distance in the pool3 space of the FID Inception-v3, named "FID" only with the
  checksum-verified pytorch-fid weights (``--fid-weights`` or ``$DIFFUSION_JAX_FID_WEIGHTS``); without
  them the command fails before anything is sampled.

Images go to the feature space in [0, 1] (:func:`diffusion_jax.data.to_image_space`, clipped), both for
samples and data. So that the numbers can be read, the same metric between the held-out split (test)
and the reference is recorded as the **floor** (row ``data:<split>``, NFE 0): a perfect sampler of the
data distribution scores about that with that many samples (Frechet distances are biased upwards at
finite sample size, so compare numbers measured with equal counts; the floor uses
``min(n_samples, len(split))`` images).

NFE. The budget given to a fixed-step sampler is the number of network evaluations of the solve
(``heun`` and ``midpoint`` take 2 per step, ``tsit5`` 6 per step plus 1, ``edm_heun`` 2 per step minus 1:
a budget that is not a multiple is rounded down to whole steps); then one more evaluation maps the
final state to the denoiser output (``denoise_final``). The ``nfe`` column is the exact count the
sampler reports, that final evaluation included; ``nfe_budget`` is what was asked. Adaptive solvers
(``dopri5``, ``tsit5_adaptive``) ignore the budget: they run once per sampler spec (budget 0) and
report the evaluations they used.

Sampler specs: ``name[:key=value[:key=value...]]``, e.g. ``gddim``, ``gddim:order=2``,
``gddim:order=1:lam=0.5``, ``sscs``, ``edm_heun:ode_jump=true``, ``dopri5:rtol=1e-3:atol=1e-3``.

Outputs under ``out`` (default ``RUN/bench_nfe``): ``results.csv`` (one row per cell, appended as soon as
the cell is done), ``results.md`` (Markdown tables), ``nfe_vs_<metric>.png`` (log-x plot),
``ref_<space>_<split>.npz`` (cached reference statistics or features) and ``samples/*.npz``. A rerun
with the same seed, sample count, metric, EMA rate and checkpoint step skips the cells already in the
CSV, so an interrupted benchmark resumes where it stopped.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import math
import os
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import samplers
from diffusion_jax.training.state import pick_ema
from diffusion_jax.samplers import COMMON_OPTIONS, DIFFRAX_ADAPTIVE, METHODS, prior_init
from diffusion_jax.samplers.plan import check_options
from diffusion_jax.sharding import data_mesh, shard_batch

Array = Any

METRICS = ("fd-pixels", "kid-pixels", "fid")
DEFAULT_SAMPLERS = ("gddim", "euler", "heun")
DEFAULT_NFES = (10, 20, 50, 100)
CSV_FIELDS = ("sampler", "method", "nfe_budget", "nfe", "metric", "value", "std", "seconds", "n_samples",
              "n_used", "seed", "ema", "step", "noise_sha")
# Options a sampler spec may set, with the types they are parsed to (all go to samplers.sample).
SAMPLER_OPTIONS: dict[str, type] = {"order": int, "lam": float, "grid": str, "rho": float, "ode_jump": bool,
                                    "rtol": float, "atol": float, "predict": str, "corrector": int,
                                    "max_gain": float}
FLOOR_PREFIX = "data:"


# ------------------------------------------------------------------ sampler specs
@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """One sampler configuration: ``label`` (as written, e.g. ``"gddim:order=2"``), the sampling
    ``method`` and the keyword options for :func:`diffusion_jax.samplers.sample`."""
    label: str
    method: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)

    @property
    def adaptive(self) -> bool:
        return self.method in DIFFRAX_ADAPTIVE


def _parse_value(key: str, text: str) -> Any:
    kind = SAMPLER_OPTIONS[key]
    if kind is bool:
        low = text.lower()
        if low not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"sampler option {key} needs true/false, got {text!r}")
        return low in ("true", "1", "yes")
    try:
        return kind(text)
    except ValueError as e:
        raise ValueError(f"sampler option {key} needs a {kind.__name__}, got {text!r}") from e


def parse_sampler(text: str) -> SamplerSpec:
    """``"gddim:order=2:lam=0.5"`` -> SamplerSpec; raises ValueError naming the valid choices."""
    parts = [p.strip() for p in text.strip().split(":")]
    method = parts[0]
    if method not in METHODS:
        raise ValueError(f"unknown sampler {method!r} in {text!r}; choose one of {', '.join(METHODS)} "
                         f"(options as name:key=value, e.g. gddim:order=2)")
    options = []
    for p in parts[1:]:
        if "=" not in p:
            raise ValueError(f"sampler option {p!r} in {text!r} must be key=value (e.g. gddim:order=2)")
        key, value = (s.strip() for s in p.split("=", 1))
        if key not in SAMPLER_OPTIONS:
            raise ValueError(f"unknown sampler option {key!r} in {text!r}; known: {', '.join(SAMPLER_OPTIONS)}")
        options.append((key, _parse_value(key, value)))
    label = method + "".join(f":{k}={v}" for k, v in options)
    return SamplerSpec(label, method, tuple(options))


def parse_samplers(items: str | Iterable[str] | None) -> list[SamplerSpec]:
    """A comma list (``"gddim,euler,heun"``) or sequence of specs -> SamplerSpecs (default gddim, euler, heun)."""
    if items is None:
        items = DEFAULT_SAMPLERS
    if isinstance(items, str):
        items = [s for s in items.split(",") if s.strip()]
    specs = [parse_sampler(s) if isinstance(s, str) else s for s in items]
    if not specs:
        raise ValueError("no samplers given: pass e.g. --samplers gddim,euler,heun")
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate sampler specs: {labels}")
    return specs


def parse_nfes(items: str | Iterable[int] | None) -> list[int]:
    """``"10,20,50"`` or a sequence -> sorted unique positive NFE budgets."""
    if items is None:
        items = DEFAULT_NFES
    if isinstance(items, str):
        items = [s for s in items.split(",") if s.strip()]
    try:
        nfes = sorted({int(v) for v in items})
    except ValueError as e:
        raise ValueError(f"--nfe must be a comma list of integers, got {items!r}") from e
    if not nfes or nfes[0] < 1:
        raise ValueError(f"NFE budgets must be integers >= 1, got {list(items)!r}")
    return nfes


# ------------------------------------------------------------------ sampling
def initial_noise(exp: Any, seed: int, n: int, batch: int | None = None) -> list[Array]:
    """The prior draws every cell starts from: batch i is ``prior_init(sde, fold_in(PRNGKey(seed), i), m)``,
    the same draws as :func:`diffusion_jax.training.sample_data` with ``PRNGKey(seed)``."""
    if n < 1:
        raise ValueError(f"n_samples must be >= 1, got {n}")
    batch = batch or n
    key = jax.random.PRNGKey(seed)
    return [prior_init(exp.sde, jax.random.fold_in(key, i), min(batch, n - start), exp.data_shape)
            for i, start in enumerate(range(0, n, batch))]


def noise_fingerprint(noise: Sequence[Array]) -> str:
    """A short sha256 of the initial noise (recorded per cell, so equal noise can be checked)."""
    h = hashlib.sha256()
    for u in noise:
        h.update(np.ascontiguousarray(np.asarray(u, np.float32)).tobytes())
    return h.hexdigest()[:16]


def sample_cell(exp: Any, params: Any, noise: Sequence[Array], spec: SamplerSpec, nfe: int, seed: int,
                progress: Callable[[str], None] | None = None) -> tuple[np.ndarray, int]:
    """Samples (n, *data) in model space from the fixed ``noise`` batches and the exact NFE per sample.

    One compiled sampler (``samplers.compile``, params as an argument) serves every batch of the cell; a short
    last batch is padded to the batch shape so it does not recompile. Every batch ends with the denoising step
    D(u, t_min) (one evaluation, counted). Stochastic samplers draw their noise from
    ``fold_in(PRNGKey(seed), 1)`` folded with the batch index. ``progress`` receives a line per batch with the ETA.
    """
    draw = samplers.compile(exp.sde, exp.apply, method=spec.method, nfe=None if spec.adaptive else int(nfe),
                            output="eps", K=exp.sqrt, denoise_final=True, **spec.kwargs)
    base = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
    full = max(int(u.shape[0]) for u in noise)
    out, counts = [], set()
    t0 = time.perf_counter()
    done, total = 0, sum(int(u.shape[0]) for u in noise)
    for i, u0 in enumerate(noise):
        m = int(u0.shape[0])
        if m < full:
            u0 = jnp.concatenate([u0, jnp.zeros((full - m,) + tuple(u0.shape[1:]), u0.dtype)])
        res = draw(params, shard_batch(u0), jax.random.fold_in(base, i) if draw.stochastic else None)
        out.append(np.asarray(res.u[:m, ..., 0]))
        if spec.adaptive:          # FSAL RK: 1 + 6 per attempted step, + the final denoising evaluation
            counts.add(1 + 6 * (int(res.stats[0]) + int(res.stats[1])) + 1)
        else:
            counts.add(draw.nfe)
        done += m
        if progress is not None:
            el = time.perf_counter() - t0
            progress(f"    {spec.label} NFE {nfe}: batch {i + 1}/{len(noise)}, {done}/{total} samples, "
                     f"{el:.1f} s, ETA {el / done * (total - done):.1f} s")
    # Fixed-step counts are equal across batches; an adaptive solve may differ: report the largest.
    return np.concatenate(out), max(counts)


# ------------------------------------------------------------------ metrics
@dataclasses.dataclass
class Metric:
    """A metric against a cached reference: ``name`` (as reported), ``space`` (feature space name) and
    ``evaluate(images_in_0_1) -> (value, std or None)``."""
    name: str
    space: str
    evaluate: Callable[[np.ndarray], tuple[float, float | None]]
    reference_path: str
    reference_count: int


def feature_space(metric: str, fid_weights: str | None = None) -> Any:
    """The feature space of ``metric``; for ``"fid"`` this loads (and verifies) the Inception weights,
    raising FileNotFoundError naming ``pt_inception-2015-12-05-6726825d.pth`` when they are missing."""
    from diffusion_jax.evaluation import PIXELS, inception_feature_space
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
    if metric == "fid":
        n = jax.device_count()                  # features batch-parallel over every device
        return inception_feature_space(fid_weights, batch_size=50 * n, mesh=data_mesh() if n > 1 else None)
    return PIXELS


def build_metric(metric: str, space: Any, reference_images: Callable[[], np.ndarray], cache_path: str,
                 kid_subset_size: int = 1000, kid_subsets: int = 100, published: bool = False,
                 chunk: int = 500) -> Metric:
    """The metric with its reference cached at ``cache_path`` (statistics for Frechet distances, the
    features themselves for KID). ``reference_images()`` ([0, 1] images) is only called on a cache miss."""
    from diffusion_jax.evaluation import (StreamingStatistics, compute_reference_statistics, frechet_distance,
                                          kid_from_features, load_published_statistics)
    if metric.startswith("kid"):
        if os.path.exists(cache_path):
            with np.load(cache_path, allow_pickle=False) as z:
                if str(z["feature_space"]) != space.name:
                    raise ValueError(f"{cache_path} holds features in space {str(z['feature_space'])!r}, not "
                                     f"{space.name!r}: delete it or pass another --ref")
                ref = z["features"]
        else:
            ref = np.asarray(space.extract(reference_images()), np.float64)
            os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
            tmp = cache_path + ".tmp.npz"
            np.savez(tmp, features=ref, feature_space=np.array(space.name))
            os.replace(tmp, cache_path)

        def evaluate(images: np.ndarray) -> tuple[float, float | None]:
            mean, std = kid_from_features(space.extract(images), ref, num_subsets=kid_subsets,
                                          subset_size=kid_subset_size)
            return mean, std
        return Metric(space.kid_name, space.name, evaluate, cache_path, int(ref.shape[0]))

    if published:
        stats = load_published_statistics(cache_path, space.name)
        if stats.feature_space != space.name:
            raise ValueError(f"{cache_path} holds statistics in feature space {stats.feature_space!r}, "
                             f"not {space.name!r}")
    else:
        stats = compute_reference_statistics(cache_path, lambda: space.extract(reference_images()),
                                             feature_space=space.name)

    def evaluate(images: np.ndarray) -> tuple[float, float | None]:
        # features streamed in chunks into float64 running statistics: no need to hold them all
        acc = StreamingStatistics()
        for i in range(0, len(images), chunk):
            acc.update(space.extract(images[i:i + chunk]))
        mu, sigma = acc.statistics()
        return frechet_distance(mu, sigma, stats.mu, stats.sigma), None
    return Metric(space.fd_name, space.name, evaluate, cache_path, stats.num_samples)


# ------------------------------------------------------------------ CSV / report
def _key(row: dict) -> tuple:
    """What makes a cell the same cell: sampler, budget, metric, sample count, seed, EMA, checkpoint step and
    the initial noise (which also depends on the sampling batch); the floor has no noise."""
    return (row["sampler"], int(row["nfe_budget"]), row["metric"], int(row["n_samples"]), int(row["seed"]),
            str(row["ema"]), int(row["step"]), str(row.get("noise_sha", "")))


def read_results(path: str) -> list[dict]:
    """Rows of ``results.csv`` (empty list when it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("sampler")]


def _append(path: str, row: dict) -> None:
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in CSV_FIELDS})
        f.flush()
        os.fsync(f.fileno())


def _fmt(v: Any) -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v)
    return f"{x:.4g}" if math.isfinite(x) else str(x)


def write_markdown(path: str, rows: list[dict], header: str) -> str:
    """results.md: the floor, a pivot table (sampler x NFE budget: value [exact NFE]) and all rows."""
    floor = [r for r in rows if r["sampler"].startswith(FLOOR_PREFIX)]
    cells = [r for r in rows if not r["sampler"].startswith(FLOOR_PREFIX)]
    lines = [header, ""]
    for r in floor:
        lines.append(f"Floor ({r['metric']} between the held-out `{r['sampler'][len(FLOOR_PREFIX):]}` split "
                     f"({r['n_used']} images) and the reference): **{_fmt(r['value'])}**")
        if r.get("n_used") and int(r["n_used"]) < int(r["n_samples"]):
            lines.append(f"(the held-out split has fewer images than the {r['n_samples']} samples per cell; "
                         f"Frechet distances shrink with sample size, so this floor sits above the one for "
                         f"{r['n_samples']} images and cells can score below it)")
    if floor:
        lines.append("")
    if cells:
        metric = cells[0]["metric"]
        budgets = sorted({int(r["nfe_budget"]) for r in cells})
        samplers = list(dict.fromkeys(r["sampler"] for r in cells))
        lines.append(f"{metric} (exact NFE incl. final denoising in brackets)")
        lines.append("")
        lines.append("| sampler | " + " | ".join(f"NFE {b}" if b else "adaptive" for b in budgets) + " |")
        lines.append("|---|" + "---|" * len(budgets))
        for s in samplers:
            vals = []
            for b in budgets:
                hit = [r for r in cells if r["sampler"] == s and int(r["nfe_budget"]) == b]
                vals.append(f"{_fmt(hit[-1]['value'])} [{hit[-1]['nfe']}]" if hit else "")
            lines.append(f"| {s} | " + " | ".join(vals) + " |")
        lines.append("")
    lines.append("| sampler | NFE budget | NFE (exact) | metric | value | std | seconds |")
    lines.append("|---|---|---|---|---|---|---|")
    for r in floor + cells:
        lines.append(f"| {r['sampler']} | {r['nfe_budget']} | {r['nfe']} | {r['metric']} | {_fmt(r['value'])} | "
                     f"{_fmt(r['std']) if r['std'] != '' else ''} | {_fmt(r['seconds'])} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def plot_results(path: str, rows: list[dict], title: str) -> str:
    """NFE (exact, log x) versus the metric, one line per sampler, the floor dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    floor = [r for r in rows if r["sampler"].startswith(FLOOR_PREFIX)]
    cells = [r for r in rows if not r["sampler"].startswith(FLOOR_PREFIX)]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    metric = (cells or floor)[0]["metric"] if rows else ""
    for s in dict.fromkeys(r["sampler"] for r in cells):
        pts = sorted((int(r["nfe"]), float(r["value"])) for r in cells if r["sampler"] == s)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=s)
    for r in floor:
        ax.axhline(float(r["value"]), ls="--", c="0.4",
                   label=f"floor: {r['sampler'][len(FLOOR_PREFIX):]} split ({r['n_used']} images) vs reference")
    ax.set_xscale("log")
    ticks = sorted({int(r["nfe"]) for r in cells})
    if ticks:
        from matplotlib.ticker import NullFormatter, ScalarFormatter
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    values = [float(r["value"]) for r in rows]
    if values and min(values) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("NFE (exact, incl. final denoising)")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------ the benchmark
def run(workdir: str, samplers: str | Iterable[str] | None = None, nfes: str | Iterable[int] | None = None,
        metric: str = "fd-pixels", n_samples: int = 1000, seed: int = 0, ema: str | float | None = None,
        out: str | None = None, batch: int | None = None, ref: str | None = None,
        fid_weights: str | None = None, floor_split: str | None = "test", save_samples: bool = True,
        config: Any = None, loaded: tuple[Any, Any] | None = None, verbose: bool = True) -> dict:
    """Run the sampler x NFE benchmark on the run in ``workdir``; returns a summary dict.

    Returns ``dict(rows=[all CSV rows of this configuration], computed=[(label, budget)],
    skipped=[(label, budget)], csv=..., markdown=..., plot=..., metric=<reported name>, floor=<row or None>,
    ema=<rate key>, step=<checkpoint step>)``. Errors for bad arguments (unknown sampler, metric,
    missing FID weights) are raised before the run is loaded or anything is sampled.
    ``loaded``: the run's ``(experiment, train state)`` when the caller already holds it (e.g. from
    ``train(...)``'s result), instead of restoring it from ``workdir`` with ``load_run``.
    """
    say = print if verbose else (lambda *a, **k: None)
    specs = parse_samplers(samplers)
    budgets = parse_nfes(nfes)
    if not (isinstance(n_samples, (int, np.integer)) and n_samples >= 2):
        raise ValueError(f"n_samples must be an integer >= 2 (a covariance needs 2), got {n_samples!r}")
    if batch is not None and batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    for spec in specs:                                  # inapplicable sampler options: fail before loading anything
        opts = {k: v for k, v in spec.kwargs.items() if k not in COMMON_OPTIONS}
        for budget in ([None] if spec.adaptive else budgets):
            check_options(spec.method, budget, opts)
    space = feature_space(metric, fid_weights)          # FID: fails here when the weights are missing

    from diffusion_jax.data import load_split, to_image_space
    from diffusion_jax.training import load_run
    exp, state = loaded if loaded is not None else load_run(workdir, config)
    step = int(jax.device_get(state.step))
    ema_key, params = pick_ema(state, ema)
    cfg = exp.config
    if cfg.data.dataset == "toy2d":
        raise ValueError("bench-nfe measures image metrics; a toy2d run has no images "
                         "(use `python -m diffusion_jax bench-solvers` for 2-D error versus NFE)")
    out = out or os.path.join(workdir, "bench_nfe")
    os.makedirs(out, exist_ok=True)
    ref_split = cfg.data.split
    cache = ref or os.path.join(out, f"ref_{space.name}_{'feat' if metric.startswith('kid') else 'stats'}_"
                                     f"{ref_split}.npz")
    met = build_metric(metric, space, lambda: to_image_space(load_split(cfg, ref_split)), cache,
                       published=ref is not None and os.path.exists(ref) and not metric.startswith("kid"))
    say(f"bench-nfe: run {workdir} (step {step}, EMA {ema_key}, family {exp.sde.name}); metric {met.name} "
        f"vs {ref_split} split ({met.reference_count} images, cached {met.reference_path})", flush=True)

    csv_path = os.path.join(out, "results.csv")
    done = {_key(r): r for r in read_results(csv_path)}
    base = dict(metric=met.name, n_samples=n_samples, seed=seed, ema=ema_key, step=step)
    computed, skipped = [], []

    floor_row = None
    if floor_split:
        label = FLOOR_PREFIX + floor_split
        held = load_split(cfg, floor_split)
        n_floor = min(n_samples, len(held))
        probe = dict(base, sampler=label, nfe_budget=0, noise_sha="")
        if _key(probe) in done:
            floor_row = done[_key(probe)]
        else:
            t0 = time.perf_counter()
            value, std = met.evaluate(to_image_space(held[:n_floor]))
            floor_row = dict(base, sampler=label, method="data", nfe_budget=0, nfe=0, value=repr(value),
                             std="" if std is None else repr(std), seconds=f"{time.perf_counter() - t0:.3f}",
                             n_used=n_floor, noise_sha="")
            _append(csv_path, floor_row)
        say(f"  floor: {met.name}({floor_split} split [{n_floor} images] vs {ref_split}) = "
            f"{_fmt(floor_row['value'])}", flush=True)

    noise = initial_noise(exp, seed, n_samples, batch)
    sha = noise_fingerprint(noise)
    for spec in specs:
        for budget in ([0] if spec.adaptive else budgets):
            probe = dict(base, sampler=spec.label, nfe_budget=budget, noise_sha=sha)
            if _key(probe) in done:
                r = done[_key(probe)]
                skipped.append((spec.label, budget))
                say(f"  {spec.label:>16s} NFE budget {budget:4d}: done before ({met.name} = {_fmt(r['value'])}, "
                    f"NFE {r['nfe']}), skipped", flush=True)
                continue
            t0 = time.perf_counter()
            x, nfe = sample_cell(exp, params, noise, spec, budget, seed,
                                 progress=(lambda line: say(line, flush=True)) if len(noise) > 1 else None)
            seconds = time.perf_counter() - t0
            if not np.all(np.isfinite(x)):
                say(f"  warning: {spec.label} at NFE {budget} produced non-finite samples", flush=True)
            images = to_image_space(np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0))
            value, std = met.evaluate(images)
            row = dict(base, sampler=spec.label, method=spec.method, nfe_budget=budget, nfe=nfe,
                       value=repr(float(value)), std="" if std is None else repr(float(std)),
                       seconds=f"{seconds:.3f}", n_used=len(x), noise_sha=sha)
            _append(csv_path, row)
            done[_key(row)] = {k: str(v) for k, v in row.items()}
            computed.append((spec.label, budget))
            if save_samples:
                path = os.path.join(out, "samples", f"{spec.label.replace(':', '_').replace('=', '-')}"
                                                    f"_nfe{budget}_seed{seed}_n{n_samples}.npz")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                np.savez(path, samples=x.astype(np.float32), nfe=nfe)
            say(f"  {spec.label:>16s} NFE budget {budget:4d}: {met.name} = {_fmt(value)}  (exact NFE {nfe}, "
                f"{seconds:.1f} s sampling incl. compile)", flush=True)

    rows = [r for r in read_results(csv_path)
            if (r["metric"], int(r["n_samples"]), int(r["seed"]), r["ema"], int(r["step"]))
            == (met.name, n_samples, seed, ema_key, step) and r["noise_sha"] in ("", sha)]
    header = (f"# bench-nfe: {workdir}\n\nfamily `{exp.sde.name}`, checkpoint step {step}, EMA {ema_key}, "
              f"{n_samples} samples per cell, seed {seed}, metric `{met.name}` against the `{ref_split}` split "
              f"({met.reference_count} images); every cell starts from the same initial noise "
              f"(sha {sha}). NFE = exact network evaluations incl. the final denoising step.")
    md = write_markdown(os.path.join(out, "results.md"), rows, header)
    png = plot_results(os.path.join(out, f"nfe_vs_{met.name}.png"), rows,
                       f"{exp.sde.name}, step {step}, EMA {ema_key}, n={n_samples}")
    say(f"wrote {csv_path}, {md}, {png}", flush=True)
    return dict(rows=rows, computed=computed, skipped=skipped, csv=csv_path, markdown=md, plot=png,
                metric=met.name, floor=floor_row, ema=ema_key, step=step, noise_sha=sha, out=out)



def run_protocol(workdir: str, seeds: Sequence[int], **kwargs: Any) -> dict:
    """The field's evaluation protocol: the benchmark for several seed sets (each its own initial noise and
    sampler noise), then per (sampler, NFE) the minimum and the mean +- std over seeds, as EDM reports FID
    (50k samples, three seed sets, the minimum and the spread). Writes ``protocol.md`` beside ``results.csv``."""
    seeds = [int(v) for v in seeds]
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError(f"the protocol needs at least two distinct seeds, got {seeds}")
    runs = [run(workdir, seed=seed, **kwargs) for seed in seeds]
    cells: dict[tuple[str, int], list[float]] = {}
    nfe_of: dict[tuple[str, int], str] = {}
    for res in runs:
        for r in res["rows"]:
            if r["sampler"].startswith(FLOOR_PREFIX):
                continue
            key = (r["sampler"], int(r["nfe_budget"]))
            cells.setdefault(key, []).append(float(r["value"]))
            nfe_of[key] = r["nfe"]
    metric = runs[0]["metric"]
    lines = [f"# bench-nfe protocol: {workdir}", "",
             f"metric `{metric}`, seeds {seeds}, {kwargs.get('n_samples', 1000)} samples per cell and seed; "
             f"min and mean +- std (ddof 1) over seeds.", "",
             f"| sampler | NFE budget | exact NFE | min {metric} | mean +- std |", "|---|---|---|---|---|"]
    summary = {}
    for (label, budget), vals in sorted(cells.items()):
        v = np.asarray(vals)
        summary[(label, budget)] = dict(min=float(v.min()), mean=float(v.mean()),
                                        std=float(v.std(ddof=1)) if len(v) > 1 else float("nan"), n=len(v))
        lines.append(f"| {label} | {budget} | {nfe_of[(label, budget)]} | {v.min():.4g} | "
                     f"{v.mean():.4g} +- {summary[(label, budget)]['std']:.2g} |")
    path = os.path.join(runs[0]["out"], "protocol.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return dict(summary=summary, markdown=path, runs=runs)

__all__ = ["run", "run_protocol", "SamplerSpec", "parse_sampler", "parse_samplers", "parse_nfes", "initial_noise",
           "noise_fingerprint", "sample_cell", "feature_space", "build_metric", "read_results",
           "write_markdown", "plot_results", "METRICS", "CSV_FIELDS"]


def main(argv: list[str] | None = None) -> int:
    """``python -m diffusion_jax bench-nfe --workdir RUN [--samplers ...] [--nfe ...] [--metric ...]``."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m diffusion_jax bench-nfe", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="the trained run (checkpoints/ and config.json)")
    p.add_argument("--samplers", default="gddim,euler,heun",
                   help="comma list of sampler specs name[:key=value...], e.g. gddim,gddim:order=2,euler,heun,sscs")
    p.add_argument("--nfe", default="10,20,50,100", help="comma list of NFE budgets")
    p.add_argument("--metric", default="fd-pixels", choices=("fid", "fd-pixels", "kid-pixels"))
    p.add_argument("--n-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (shared by every cell)")
    p.add_argument("--seeds", default=None,
                   help="comma list of seeds: the protocol (each seed set, then min and mean +- std), e.g. 0,1,2")
    p.add_argument("--ema", default=None, help="EMA rate to use (default: the largest in the run)")
    p.add_argument("--out", default=None, help="output folder (default RUN/bench_nfe)")
    p.add_argument("--batch", type=int, default=None, help="sampling batch (default: all samples at once)")
    p.add_argument("--ref", default=None, help="reference statistics .npz (default: cached under --out)")
    p.add_argument("--fid-weights", default=None,
                   help="pt_inception-2015-12-05-6726825d.pth (or $DIFFUSION_JAX_FID_WEIGHTS) for --metric fid")
    p.add_argument("--floor-split", default="test",
                   help="held-out split measured against the reference as the floor ('' to skip)")
    a = p.parse_args(argv)
    kw = dict(samplers=a.samplers, nfes=a.nfe, metric=a.metric, n_samples=a.n_samples, ema=a.ema, out=a.out,
              batch=a.batch, ref=a.ref, fid_weights=a.fid_weights, floor_split=a.floor_split or None)
    if a.seeds:
        run_protocol(a.workdir, [int(v) for v in a.seeds.split(",") if v.strip()], **kw)
    else:
        run(a.workdir, seed=a.seed, **kw)
    return 0
