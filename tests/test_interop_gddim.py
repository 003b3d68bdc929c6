"""Checkpoint import, format ``gddim`` (diffusion_jax.interop.gddim): gDDIM's released JAX CLD checkpoint.

Golden outputs (tests/fixtures/make_gddim_golden.py, run once with gDDIM's own cld_jax code): on random
weights of two tiny NCSN++ networks (the released model's options; gDDIM's mixed score with a positional
embedding), gDDIM's eps_fn and score_fn on CLD states from its own perturb_data, and its R_t table.
The checkpoints are written here at test time in gDDIM's format (flax msgpack of models.utils.State).
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from scipy.integrate import solve_ivp

from diffusion_jax.interop import CheckpointMismatch, gddim, import_checkpoint
from diffusion_jax.interop.ncsnpp_weights import _flatten, _shapes
from diffusion_jax.param import score_from_eps
from diffusion_jax.training import configs
from diffusion_jax.training.loop import load_run
from diffusion_jax.training.setup import build_experiment
from diffusion_jax.training.state import pick_ema

from torch_format import torch_save
from peer_checkpoints import check_samples_and_bpd
import make_gddim_golden as make_golden

FIX = Path(__file__).parent / "fixtures"
GOLD = np.load(FIX / "gddim_golden.npz")
CASES = list(make_golden.CASES)
NET_KEYS = ("nf", "ch_mult", "num_res_blocks", "attn_resolutions", "resamp_with_conv", "fir", "fir_kernel",
            "skip_rescale", "resblock_type", "progressive", "progressive_input", "progressive_combine",
            "embedding_type", "fourier_scale", "init_scale")


def unflatten(flat: dict) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        parts = path.split("/") if isinstance(path, str) else list(path)
        for k in parts[:-1]:
            node = node.setdefault(k, {})
        node[parts[-1]] = v
    return tree


def write_gddim_checkpoint(path: Path, target: dict, ema: dict, step: int = 750_000) -> None:
    """gDDIM's checkpoint file: flax.serialization.to_bytes(models.utils.State) as flax 0.3.1 writes it."""
    adam = jax.tree_util.tree_map(lambda w: {"grad_ema": np.zeros_like(w), "grad_sq_ema": np.zeros_like(w)}, target)
    state = {"step": np.asarray(step, np.int32),
             "optimizer": {"target": target, "state": {"step": np.asarray(step, np.int32), "param_states": adam}},
             "lr": 2e-4, "model_state": {}, "ema_rate": 0.9999, "params_ema": ema,
             "rng": np.array([0, 8], np.uint32)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(serialization.msgpack_serialize(state))


def case_config(case: str, data_dir: str = ""):
    opts = json.loads(str(GOLD[f"{case}/options"]))
    c = configs.digits("cld", beta=opts["beta_0"], m_inv=opts["m_inv"], init_gamma=opts["vv_gamma"])
    c.model.name = "ncsnpp"
    c.model.kwargs = {k: tuple(opts[k]) if isinstance(opts[k], list) else opts[k] for k in NET_KEYS}
    c.model.kwargs["dropout"] = 0.0
    c.model.K = "R"
    c.model.mixed_score = bool(opts["mixed_score"])
    c.data.data_dir = data_dir
    return c, opts


@functools.lru_cache(maxsize=None)
def exact_r(ts: tuple[float, ...]) -> np.ndarray:
    """gDDIM's R_t ODE solved independently (LSODA, in t; F, G G^T and R_0 written out for beta 4, M^-1 4,
    gamma 0.04, numerical_eps 1e-6), at the times ``ts`` (increasing): shape (len(ts), 2, 2)."""
    F = np.array([[0.0, 16.0], [-4.0, -16.0]])
    GG = np.diag([0.0, 8.0])
    rhs = lambda _, y: (F @ y.reshape(2, 2) + 0.5 * GG @ np.linalg.inv(y.reshape(2, 2)).T).ravel()  # noqa: E731
    r0 = np.diag([1e-3, np.sqrt(0.04 / 4.0 + 1e-6)])
    sol = solve_ivp(rhs, (0.0, ts[-1]), r0.ravel(), method="LSODA", rtol=1e-12, atol=1e-16, t_eval=ts)
    return sol.y.T.reshape(-1, 2, 2)


@pytest.mark.parametrize("case", CASES)
def test_forward_and_score_match_gddim_reference(case, tmp_path):
    c, opts = case_config(case)
    case_index = CASES.index(case)
    spec = [(p, tuple(s)) for p, s in json.loads(str(GOLD[f"{case}/spec"]))]
    ema = unflatten(make_golden.random_weights(spec, seed=3000 + case_index))
    raw = jax.tree_util.tree_map(lambda w: w + np.float32(0.01), ema)
    ckpt = tmp_path / "checkpoints" / "checkpoint_15"
    write_gddim_checkpoint(ckpt, raw, ema)

    c.model.peer = "gddim"
    shape = (opts["image_size"], opts["image_size"], opts["num_channels"])
    exp = build_experiment(c, shape)
    assert (exp.precond.mixed, exp.precond.embedding) == {"released": (False, "fourier"),
                                                          "mixed_positional": (True, "positional")}[case]
    params, ema_params, rate, step = gddim.convert(gddim.load(str(ckpt.parent)), exp.net, shape[:2], str(ckpt))
    assert (rate, step) == (0.9999, 750_000)

    u = jnp.asarray(GOLD[f"{case}/u"])
    t = jnp.asarray(GOLD["t"])
    net = lambda p: (lambda x, c_noise, train=False: exp.net.apply({"params": p}, x, c_noise, train=False))  # noqa
    both = jax.jit(lambda p, u, t: (exp.precond.peer_eps(net(p), u, t), exp.eps_fn(p)(u, t)))
    peer_eps, eps = both(ema_params, u, t)
    # the forward pass: gDDIM's eps_fn (network output in its (g d) channel layout, + its mixed term
    # R_t^{-1} (0, v), here with the exact R_t in place of gDDIM's float32 table, ~1e-5 apart)
    r_ref = GOLD[f"{case}/R"].astype(np.float64)
    r_exacts = exact_r(tuple(float(ti) for ti in GOLD["t"]))
    expected = GOLD[f"{case}/eps"].astype(np.float64)
    if opts["mixed_score"]:
        v_only = np.asarray(u, np.float64) * np.array([0.0, 1.0])
        mix = lambda r: np.einsum("bij,b...j->b...i", np.linalg.inv(r), v_only)  # noqa: E731
        expected = expected - mix(r_ref) + mix(r_exacts)
    np.testing.assert_allclose(np.asarray(peer_eps), expected, atol=1e-5, rtol=0)

    # the library's eps w.r.t. its own K_t gives gDDIM's score: -K^{-T} eps_lib = -R^{-T} eps_gddim
    score = np.asarray(score_from_eps(exp.sde, eps, exp.sqrt(t)), np.float64)
    for i, ti in enumerate(np.asarray(t, np.float64)):
        r_exact = r_exacts[i]
        # gDDIM's float32 RK4 table of R_t agrees with the exact solution; the library's R_t is the exact one
        assert np.abs(r_ref[i] - r_exact).max() <= 2e-5 * np.abs(r_exact).max()
        r_lib = np.asarray(exp.precond.root(t[i:i + 1]))[0]
        assert np.abs(r_lib - r_exact).max() <= 1e-6 * np.abs(r_exact).max()
        # score: gDDIM's formula (sde.eps2score) on its eps with the exact R_t ...
        ref = -np.einsum("ji,...j->...i", np.linalg.inv(r_exact), expected[i])
        scale = np.abs(ref).max()
        assert np.abs(score[i] - ref).max() <= 5e-6 * scale, (ti, np.abs(score[i] - ref).max() / scale)
        # ... and gDDIM's own score_fn (its float32 R table: ~1e-5 from the exact R_t)
        assert np.abs(score[i] - GOLD[f"{case}/score"][i]).max() <= 3e-5 * np.abs(GOLD[f"{case}/score"][i]).max()
    # the raw (non-EMA) weights are imported too and differ
    assert float(np.max(np.abs(np.asarray(jax.tree_util.tree_leaves(params)[0])
                               - np.asarray(jax.tree_util.tree_leaves(ema_params)[0])))) > 5e-3


def digits_checkpoint(root: Path, c) -> tuple[Path, dict]:
    """A gDDIM checkpoint of the digits-sized network (random weights by the library's own parameter names)."""
    exp = build_experiment(c, (8, 8, 1))
    shapes, _ = _shapes(exp.net, (8, 8))
    spec = sorted(("/".join(p), tuple(s.shape)) for p, s in _flatten(shapes).items())
    ema = unflatten(make_golden.random_weights(spec, seed=7))
    raw = unflatten(make_golden.random_weights(spec, seed=8))
    write_gddim_checkpoint(root / "checkpoints" / "checkpoint_15", raw, ema, step=1_500_000)
    (root / "checkpoints" / "checkpoint_2").write_bytes(b"\x81\xa4step")      # older, broken: not picked
    return root / "checkpoints", ema


def test_import_then_bench_nfe_and_bpd(tmp_path):
    c, _ = case_config("released", str(tmp_path / "tfds"))
    c.model.kwargs.update(attn_resolutions=(), ch_mult=(1,), nf=8)   # a small graph (one level): quick compiles
    ckpt_dir, ema = digits_checkpoint(tmp_path / "gddim", c)
    workdir = str(tmp_path / "run")
    import_checkpoint("gddim", str(ckpt_dir), c, workdir)
    exp, state = load_run(workdir)
    assert exp.config.model.peer == "gddim" and int(state.step) == 1_500_000
    key, ema_loaded = pick_ema(state)
    assert float(key) == 0.9999
    for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(ema_loaded)[0], jax.tree_util.tree_leaves(ema)):
        np.testing.assert_array_equal(np.asarray(a), b, err_msg=str(p))
    check_samples_and_bpd(workdir, tmp_path)


def test_missing_file_names_the_file_and_where_it_is_published(tmp_path):
    c, _ = case_config("released")
    with pytest.raises(FileNotFoundError, match=r"checkpoint_<n>.*github.com/qsh-zh/gDDIM"):
        import_checkpoint("gddim", str(tmp_path / "checkpoint_15"), c, str(tmp_path / "run"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no gDDIM checkpoint file checkpoint_<n>.*qsh-zh/gDDIM"):
        import_checkpoint("gddim", str(tmp_path / "empty"), c, str(tmp_path / "run"))


def test_truncated_and_foreign_files_are_refused(tmp_path):
    c, _ = case_config("released")
    ckpt_dir, _ = digits_checkpoint(tmp_path / "gddim", c)
    data = (ckpt_dir / "checkpoint_15").read_bytes()
    bad = tmp_path / "truncated"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        import_checkpoint("gddim", str(bad), c, str(tmp_path / "run"))
    # a torch checkpoint (zip + pickle) is not msgpack: refused, never unpickled
    torch_file = str(tmp_path / "model.pth")
    torch_save({"step": 3, "model": {"w": np.zeros(3, np.float32)}}, torch_file)
    with pytest.raises(ValueError, match="not a gDDIM checkpoint"):
        import_checkpoint("gddim", torch_file, c, str(tmp_path / "run"))
    # msgpack, but not a gDDIM State
    other = tmp_path / "other"
    other.write_bytes(serialization.msgpack_serialize({"params": {"w": np.zeros(3, np.float32)}}))
    with pytest.raises(CheckpointMismatch, match="'params_ema'.*found \\['params'\\]"):
        import_checkpoint("gddim", str(other), c, str(tmp_path / "run"))
    assert not os.path.isdir(tmp_path / "run" / "checkpoints")


def test_other_architecture_lists_missing_extra_and_wrong_shape(tmp_path):
    c, _ = case_config("released")
    ckpt_dir, _ = digits_checkpoint(tmp_path / "gddim", c)
    c.model.kwargs["nf"] = 8                               # wrong widths
    c.model.kwargs["progressive_input"] = "none"           # no input pyramid: its layers are extra
    c.model.kwargs["progressive"] = "output_skip"          # an output pyramid: its layers are missing
    with pytest.raises(CheckpointMismatch) as err:
        import_checkpoint("gddim", str(ckpt_dir), c, str(tmp_path / "run"))
    msg = str(err.value)
    assert "['optimizer']['target']" in msg
    for part in ("missing (", "unexpected (", "wrong shape ("):
        assert part in msg, msg
    assert "Conv_0/kernel" in msg                          # named by the score_sde Flax path
    assert not os.path.isdir(tmp_path / "run" / "checkpoints")


def test_wrong_family_is_refused_before_reading(tmp_path):
    unread = tmp_path / "checkpoint_15"
    unread.write_bytes(b"never read: the family is checked first")
    c, _ = case_config("released")
    c.family = configs.family_config("vp")
    with pytest.raises(ValueError, match="family.name='cld'"):
        import_checkpoint("gddim", str(unread), c, str(tmp_path / "a"))
    c, _ = case_config("released")
    c.family = configs.family_config("cld", beta=4.0, m_inv=4.0, init_gamma=0.04, gamma=2.0)
    with pytest.raises(ValueError, match="critically damped"):
        import_checkpoint("gddim", str(unread), c, str(tmp_path / "b"))


def test_config_matches_the_released_network():
    """configs/cifar10_cld_gddim_ncsnpp.py builds exactly the released model's parameter tree (names, shapes:
    from gDDIM's own init of configs/accr_dcifar10_config.py), so the released checkpoint maps one to one."""
    from diffusion_jax.training.configs import load_config
    c = load_config(str(Path(__file__).parents[1] / "configs" / "cifar10_cld_gddim_ncsnpp.py"), [])
    c.model.peer = "gddim"
    assert c.model.peer == "gddim" and c.family.name == "cld" and c.model.K == "R"
    exp = build_experiment(c, (32, 32, 3))
    shapes, _ = _shapes(exp.net, (32, 32))
    ours = sorted(("/".join(p), tuple(s.shape)) for p, s in _flatten(shapes).items())
    ref = [(p, tuple(s)) for p, s in json.loads(str(GOLD["released_cifar10/spec"]))]
    assert ours == ref
    assert sum(int(np.prod(s)) for _, s in ref) == 107_597_446
