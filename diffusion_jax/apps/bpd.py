r"""Bits per dimension of a trained run: ``python -m diffusion_jax bpd --workdir RUN``.

For image data with ``levels`` grey levels (17 for digits, 256 for CIFAR-10) every example of the split is
mapped back to its integers v, dequantised uniformly over its cell (:func:`diffusion_jax.evaluation.likelihood.dequantize`,
the "grid" convention of the data pipeline: cell width Delta = 2 / (levels - 1) in model space), and its
log-density under the run's probability-flow ODE is computed by :func:`diffusion_jax.evaluation.likelihood.log_likelihood`
(Dopri5, ``trace`` = Hutchinson with ``probes`` Rademacher probes or the exact divergence). Then

    bpd = -log p(x) / (D ln 2) - log2 Delta                         (D = H W C data dimensions)

(:func:`diffusion_jax.evaluation.likelihood.bits_per_dim`), an upper bound on the discrete bits/dim in expectation over the
dequantisation noise. For k = 1 families (vp, ve) log p is the model density of x_0 at ``t_eps``; for k >= 2
families (cld, cdhold, psld, ...) it is one draw of the lower bound that marginalises the auxiliary
coordinates with r(a | x_0) (``aux="forward"`` by default, see :mod:`diffusion_jax.evaluation.likelihood`), so the
reported bits/dim is an upper bound on the model's bits/dim of the data coordinate. Toy 2-D data is
continuous: no dequantisation, bpd = -log p / (D ln 2).

Reported: the mean over examples with its standard error (std / sqrt(n), over examples, dequantisation
draws, auxiliary draws and probes together), the mean NFE per example, and a JSON with every per-example value.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.evaluation.likelihood import AUX_LAWS, TRACES, bits_per_dim, dequantize, log_likelihood

Array = Any


def to_levels(x_model: np.ndarray, levels: int) -> np.ndarray:
    """Model-space images on the data grid (x = 2 v / (levels - 1) - 1) -> the integers v (int32).

    Raises ValueError when ``x_model`` is not on that grid (e.g. already dequantised or rescaled data).
    """
    x = np.asarray(x_model, np.float64)
    v = (x + 1.0) * (levels - 1) / 2.0
    r = np.round(v)
    if x.size and (np.max(np.abs(v - r)) > 1e-3 or r.min() < 0 or r.max() > levels - 1):
        raise ValueError(f"the data is not on the {levels}-level grid 2 v / {levels - 1} - 1 of the data "
                         f"pipeline (max distance {np.max(np.abs(v - r)):.3g}); pass the split as loaded by "
                         f"diffusion_jax.data.load_split")
    return r.astype(np.int32)


def bound_kind(order: int) -> str:
    """What the reported number is, in words, for a family with k = ``order``."""
    if order == 1:
        return "exact model density of x_0 at t_eps (k = 1), dequantised: upper bound on discrete bits/dim"
    return (f"auxiliary-marginalising bound (k = {order}): E_r[log p(x_0, a) - log r(a | x_0)] <= log p(x_0), "
            f"dequantised: upper bound on discrete bits/dim")


def bits_per_dim_of(exp: Any, params: Any, x_model: np.ndarray, key: Array, *, levels: int | None,
                    trace: str = "hutchinson", n_probes: int = 1, t_eps: float | None = None,
                    aux: str = "forward", batch: int = 64, rtol: float = 1e-5, atol: float = 1e-5,
                    fn: Callable | None = None, verbose: bool = False) -> dict:
    """Per-example bits/dim of ``x_model`` (n, *data) in model space under the experiment's network.

    ``levels``: number of integer levels of the data (dequantised uniformly, "grid" convention), or None for
    continuous data. ``key`` drives the dequantisation (``fold_in(key, 0)``) and, per batch i, the auxiliary
    draw and Hutchinson probes (``fold_in(fold_in(key, 1), i)``). Batches are padded to ``batch`` rows (by
    repeating rows, discarded afterwards) so one compiled solve serves every batch. ``fn`` overrides the
    network (eps w.r.t. ``exp.sqrt``).

    Returns a dict of numpy arrays: ``bpd``, ``logp`` (nats; the bound for k >= 2), ``logp_state``,
    ``log_q_aux``, ``nfe`` (per example), ``x`` (the dequantised inputs), ``u_eps`` (x with the auxiliary draw,
    (n, *data, k)) and ``u_T``, plus ``num_dims``.
    """
    if trace not in TRACES:
        raise ValueError(f"unknown trace estimator {trace!r}; choose one of {TRACES}")
    if aux not in AUX_LAWS:
        raise ValueError(f"unknown auxiliary law {aux!r}; choose one of {AUX_LAWS}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    x_model = np.asarray(x_model, np.float32)
    if x_model.ndim < 2 or x_model.shape[0] < 1:
        raise ValueError(f"x_model must have shape (n >= 1, *data), got {x_model.shape}")
    n = x_model.shape[0]
    num_dims = int(np.prod(x_model.shape[1:]))
    k_deq, k_ll = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
    if levels is None:
        x = x_model
    else:
        x = np.asarray(dequantize(k_deq, to_levels(x_model, levels), levels), np.float32)
    # the network's parameters enter the compiled solve as an argument: one compile for every batch
    apply, fn_params = (fn, None) if fn is not None else (exp.apply, params)
    batch = min(batch, n)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("logp", "logp_state", "log_q_aux", "nfe", "u_eps",
                                                            "u_T")}
    t0 = time.perf_counter()
    for i, start in enumerate(range(0, n, batch)):
        m = min(batch, n - start)
        idx = np.arange(start, start + batch)
        idx = np.where(idx < n, idx, start + (idx - start) % m)       # pad by repeating this batch's rows
        res = log_likelihood(exp.sde, apply, jnp.asarray(x[idx]), params=fn_params, key=jax.random.fold_in(k_ll, i),
                             output="eps",
                             K=exp.sqrt, t_eps=t_eps, trace=trace, n_probes=n_probes, aux=aux, rtol=rtol,
                             atol=atol)
        for name in parts:
            parts[name].append(np.asarray(getattr(res, name))[:m])
        if verbose:
            done = start + m
            bpd_so_far = bits_per_dim(np.concatenate(parts["logp"]), num_dims, dequantize_bins=levels)
            print(f"  {done}/{n} examples: mean bpd so far {float(np.mean(bpd_so_far)):.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    out = {name: np.concatenate(v) for name, v in parts.items()}
    out["bpd"] = np.asarray(bits_per_dim(out["logp"], num_dims, dequantize_bins=levels), np.float64)
    out["x"] = x
    out["num_dims"] = num_dims
    return out


def summarize(bpd: np.ndarray) -> tuple[float, float]:
    """(mean, standard error of the mean) over examples."""
    b = np.asarray(bpd, np.float64)
    sem = float(np.std(b, ddof=1) / math.sqrt(len(b))) if len(b) > 1 else float("nan")
    return float(np.mean(b)), sem


def run(workdir: str, n: int | None = 200, split: str | None = None, trace: str = "hutchinson",
        n_probes: int = 1, t_eps: float | None = None, aux: str = "forward", ema: str | float | None = None,
        seed: int = 0, batch: int = 64, rtol: float = 1e-5, atol: float = 1e-5, out: str | None = None,
        config: Any = None, loaded: tuple[Any, Any] | None = None, verbose: bool = True) -> dict:
    """Bits/dim of the run in ``workdir`` on the first ``n`` examples of ``split`` (default the config's
    eval split, ``test`` for images; None = all); writes a JSON and returns the summary dict.

    ``loaded``: the run's ``(experiment, train state)`` if the caller holds it already (else ``load_run``).
    """
    from diffusion_jax.training.state import pick_ema
    from diffusion_jax.data import levels as levels_of, load_split
    from diffusion_jax.training import load_run
    say = print if verbose else (lambda *a, **k: None)
    if n is not None and n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if trace not in TRACES:
        raise ValueError(f"unknown trace estimator {trace!r}; choose one of {TRACES}")
    exp, state = loaded if loaded is not None else load_run(workdir, config)
    step = int(jax.device_get(state.step))
    ema_key, params = pick_ema(state, ema)
    cfg = exp.config
    split = split or cfg.data.eval_split
    data = load_split(cfg, split, n)
    lev = None if cfg.data.dataset == "toy2d" else levels_of(cfg.data.dataset)
    t_used = exp.sde.t_min if t_eps is None else float(t_eps)
    kind = bound_kind(exp.sde.order)
    say(f"bpd: run {workdir} (step {step}, EMA {ema_key}, family {exp.sde.name}, k={exp.sde.order}) on "
        f"{len(data)} `{split}` examples, trace={trace}"
        f"{f' ({n_probes} probes)' if trace == 'hutchinson' else ''}, t_eps={t_used:g}"
        f"{f', aux={aux}' if exp.sde.order > 1 else ''}", flush=True)
    say(f"  reporting: {kind}", flush=True)
    t0 = time.perf_counter()
    res = bits_per_dim_of(exp, params, data, jax.random.PRNGKey(seed), levels=lev, trace=trace, n_probes=n_probes,
                          t_eps=t_eps, aux=aux, batch=batch, rtol=rtol, atol=atol, verbose=verbose)
    seconds = time.perf_counter() - t0
    mean, sem = summarize(res["bpd"])
    if not np.all(np.isfinite(res["bpd"])):
        say(f"  warning: {int(np.sum(~np.isfinite(res['bpd'])))} non-finite values", flush=True)
    summary = dict(
        workdir=os.path.abspath(workdir), step=step, ema=ema_key, family=exp.sde.name, k=exp.sde.order,
        split=split, n=int(len(data)), trace=trace, n_probes=int(n_probes) if trace == "hutchinson" else None,
        t_eps=t_used, aux=aux if exp.sde.order > 1 else None, levels=lev, dequantization="uniform, grid convention"
        if lev else None, rtol=rtol, atol=atol, seed=seed, bound=kind, bpd_mean=mean, bpd_sem=sem,
        nll_nats_mean=float(-np.mean(res["logp"])), num_dims=res["num_dims"], nfe_mean=float(np.mean(res["nfe"])),
        seconds=seconds, bpd=[float(v) for v in res["bpd"]], nfe=[int(v) for v in res["nfe"]],
        logp=[float(v) for v in res["logp"]], logp_state=[float(v) for v in res["logp_state"]],
        log_q_aux=[float(v) for v in res["log_q_aux"]])
    if out is None:
        out = os.path.join(workdir, f"bpd_{split}_n{len(data)}_{trace}_seed{seed}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(summary, f, indent=1)
    label = "bits/dim" if exp.sde.order == 1 else "bits/dim (bound)"
    say(f"{label}: {mean:.4f} ± {sem:.4f} (standard error, n={len(data)}); mean NFE {summary['nfe_mean']:.0f}; "
        f"{seconds:.1f} s; wrote {out}", flush=True)
    summary["json"] = out
    return summary


__all__ = ["run", "bits_per_dim_of", "to_levels", "summarize", "bound_kind"]


def main(argv: list[str] | None = None) -> int:
    """``python -m diffusion_jax bpd --workdir RUN [--n 200] [--split test] ...``."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m diffusion_jax bpd", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--n", type=int, default=200, help="number of examples (0: the whole split)")
    p.add_argument("--split", default=None, help="data split (default: config.data.eval_split, 'test')")
    p.add_argument("--trace", default="hutchinson", choices=TRACES)
    p.add_argument("--probes", type=int, default=1, help="Hutchinson probes per example")
    p.add_argument("--t-eps", type=float, default=None, help="start time of the ODE (default: the family's t_min)")
    p.add_argument("--aux", default="forward", choices=AUX_LAWS,
                   help="auxiliary law r(a | x_0) of the bound for k >= 2 families")
    p.add_argument("--ema", default=None, help="EMA rate to use (default: the largest in the run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--out", default=None, help="JSON path (default RUN/bpd_<split>_n<N>_<trace>_seed<S>.json)")
    a = p.parse_args(argv)
    run(a.workdir, n=a.n or None, split=a.split, trace=a.trace, n_probes=a.probes, t_eps=a.t_eps, aux=a.aux,
        ema=a.ema, seed=a.seed, batch=a.batch, rtol=a.rtol, atol=a.atol, out=a.out)
    return 0
