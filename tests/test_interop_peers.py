"""Checkpoint import of the phase-space peers: CLD-SGM (``cld_sgm``) and PSLD (``psld``).

Golden fixtures (tests/fixtures/make_cld_sgm_golden.py, make_psld_golden.py; run once with the reference code
and torch): a tiny NCSN++ of each peer on random weights, its raw output and the reference's own score function
(CLD-SGM: ``models.utils.get_score_fn`` with the mixed score, the velocity score; PSLD: ``PSLD.get_score`` on
the EMA network's eps) at t in {1e-3, 0.1, 0.5, 1}. The checkpoints are rebuilt in the peers' file layouts at
test time (tests/peer_checkpoints.py).

Tolerances (float32): network output max abs err <= 1e-5; score max abs err <= 1e-5 * max(1, max |score|) per
t, i.e. absolute where the score is O(1)-O(10) (t >= 0.1) and relative at t = 1e-3, where the scores reach
~1e2 (measured: CLD-SGM 3e-5 abs at |score| 144, PSLD 1.6e-4 abs at |score| 227; <= 6e-6 abs elsewhere).
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.evaluation.torch_pickle import UnsafeCheckpointError, load_torch_checkpoint
from diffusion_jax.interop import CheckpointMismatch, import_checkpoint
from diffusion_jax.param import score_from_eps
from diffusion_jax.training import configs
from diffusion_jax.training.loop import load_run
from diffusion_jax.training.state import pick_ema
from peer_checkpoints import cld_sgm_checkpoint, psld_checkpoint
from peer_checkpoints import check_samples_and_bpd
from torch_format import torch_save

FIX = Path(__file__).parent / "fixtures"
PEERS = {
    "cld_sgm": dict(family="cld", gold=np.load(FIX / "cld_sgm_tiny_golden.npz"), build=cld_sgm_checkpoint,
                    name="checkpoint_2345.pth", mixed=True, published="checkpoint_800000.pth.*nv-tlabs/CLD-SGM"),
    "psld": dict(family="psld", gold=np.load(FIX / "psld_tiny_golden.npz"), build=psld_checkpoint,
                 name="psld-epoch=49.ckpt", mixed=False, published=r"\.ckpt.*mandt-lab/PSLD"),
}


def tiny_config(fmt: str, data_dir: str = ""):
    """The golden networks' options (the reference CIFAR-10 layouts shrunk to 8x8x1) on the digits data."""
    peer = PEERS[fmt]
    c = configs.digits(peer["family"])
    c.model.name = "ncsnpp"
    c.model.kwargs = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, fir=True,
                          fir_kernel=(1, 3, 3, 1), resblock_type="biggan", skip_rescale=True, progressive="none",
                          progressive_input="residual", progressive_combine="sum", embedding_type="fourier",
                          fourier_scale=16.0, init_scale=0.0)
    c.model.K = "L"
    c.model.mixed_score = peer["mixed"]
    c.ema_rates = (0.9999,)
    c.data.data_dir = data_dir
    return c


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("peer_ckpts")
    return {fmt: p["build"](p["gold"], str(root / p["name"])) for fmt, p in PEERS.items()}


@pytest.fixture(scope="module")
def imported(tmp_path_factory, ckpts):
    root = tmp_path_factory.mktemp("peer_runs")
    return {fmt: import_checkpoint(fmt, ckpts[fmt], tiny_config(fmt, str(root / "tfds")), str(root / fmt))
            for fmt in PEERS}


def _nchw_blocks_to_state(a: np.ndarray) -> np.ndarray:
    """(B, 2 C, H, W) in [x, v] blocks -> the library's state (B, H, W, C, 2)."""
    b, kc, h, w = a.shape
    return np.transpose(a.reshape(b, 2, kc // 2, h, w), (0, 3, 4, 2, 1))


@pytest.fixture(scope="module")
def evaluated(imported):
    """Per format: the loaded run, the golden states in the library's layout, and (raw network output, eps) of
    the EMA and of the raw weights from one compiled function."""
    res = {}
    for fmt, workdir in imported.items():
        gold = PEERS[fmt]["gold"]
        exp, state = load_run(workdir)
        u = jnp.asarray(_nchw_blocks_to_state(gold["u"]))
        t = jnp.asarray(gold["t"], jnp.float32)
        fn = jax.jit(lambda p, u, t, exp=exp: (
            exp.net.apply({"params": p}, exp.precond.to_network(u), jnp.log(t), train=False), exp.apply(p, u, t)))
        rate, ema = pick_ema(state)
        res[fmt] = dict(exp=exp, state=state, rate=rate, u=u, t=t, ema=fn(ema, u, t), raw=fn(state.params, u, t))
    return res


@pytest.mark.parametrize("fmt", list(PEERS))
def test_output_and_score_parity_with_the_reference(evaluated, fmt):
    gold, r = PEERS[fmt]["gold"], evaluated[fmt]
    exp, t = r["exp"], r["t"]
    assert int(r["state"].step) == int(gold["step"])
    assert float(r["rate"]) == float(gold["ema_rate"])
    # the raw network output (the peer's own time feature log t), EMA weights
    out, eps = r["ema"]
    np.testing.assert_allclose(np.asarray(out), np.transpose(gold["out"], (0, 2, 3, 1)), atol=1e-5, rtol=0)
    # the library's score of the imported model = the reference's score function
    score = np.asarray(score_from_eps(exp.sde, eps, exp.sqrt(t)[:, None, None, None]))
    if fmt == "cld_sgm":          # CLD-SGM's score function returns the velocity score only
        got, ref = score[..., 1], np.transpose(gold["score"], (0, 2, 3, 1))
    else:
        got, ref = score, _nchw_blocks_to_state(gold["score"])
    for i in range(len(t)):
        err, scale = float(np.max(np.abs(got[i] - ref[i]))), float(np.max(np.abs(ref[i])))
        assert err <= 1e-5 * max(1.0, scale), (fmt, float(t[i]), err, scale)
    # the raw weights are in the state too, and differ from the EMA ones
    assert float(jnp.max(jnp.abs(r["raw"][1] - eps))) > 1e-3


def test_cld_sgm_position_part_implies_the_same_denoiser(evaluated):
    """The completed eps: u - K eps = m_t x0_hat with one x0_hat for x and v (CLD-SGM's get_x0_prediction)."""
    r = evaluated["cld_sgm"]
    exp, u, t, eps = r["exp"], r["u"], r["t"], r["ema"][1]
    mean = np.asarray(u - exp.sde.apply(exp.sqrt(t), eps), np.float64)   # = m_t x0_hat per coordinate
    m = np.asarray(exp.sde.mean_coefficient(t), np.float64)[:, None, None, None, :]
    x0_from_x, x0_from_v = mean[..., 0] / m[..., 0], mean[..., 1] / m[..., 1]
    scale = np.max(np.abs(x0_from_v), axis=(1, 2, 3))
    err = np.max(np.abs(x0_from_x - x0_from_v), axis=(1, 2, 3))
    # t = 1e-3 left out: m_v ~ -4e-3, so x0 from v loses ~1e-3 to float32 cancellation (measured 4.5e-3 at |x0| 3)
    assert np.all(err[1:] <= 1e-5 * np.maximum(scale[1:], 1.0)), (err, scale)


@pytest.mark.parametrize("fmt", list(PEERS))
def test_imported_run_samples_and_bpd(imported, fmt, tmp_path):
    check_samples_and_bpd(imported[fmt], tmp_path)


@pytest.mark.parametrize("fmt", list(PEERS))
def test_missing_file_names_the_file_and_where_it_is_published(fmt, tmp_path):
    with pytest.raises(FileNotFoundError, match=PEERS[fmt]["published"]):
        import_checkpoint(fmt, str(tmp_path / "nope"), tiny_config(fmt), str(tmp_path / "run"))


@pytest.mark.parametrize("fmt", list(PEERS))
def test_truncated_file_is_refused(fmt, ckpts, tmp_path):
    data = open(ckpts[fmt], "rb").read()
    bad = tmp_path / "truncated"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        import_checkpoint(fmt, str(bad), tiny_config(fmt), str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("fmt", list(PEERS))
def test_disallowed_global_is_refused_without_executing(fmt, ckpts, tmp_path):
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    obj = load_torch_checkpoint(ckpts[fmt])
    good = tmp_path / "good"
    torch_save(obj, str(good))                 # the real layout, re-written, loads ...
    assert sorted(load_torch_checkpoint(str(good))) == sorted(obj)
    with zipfile.ZipFile(good) as zf:           # ... and with one entry replaced by a call of os.system it is refused
        records = {n: zf.read(n) for n in zf.namelist()}
    key = "model" if fmt == "cld_sgm" else "state_dict"
    evil = pickle.dumps({key: Evil()}, protocol=2)
    path = tmp_path / "evil"
    with zipfile.ZipFile(path, "w") as zf:
        for n, b in records.items():
            zf.writestr(n, evil if n.endswith("data.pkl") else b)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        import_checkpoint(fmt, str(path), tiny_config(fmt), str(tmp_path / "run"))
    assert not marker.exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("fmt", list(PEERS))
def test_other_architecture_lists_keys(fmt, ckpts, tmp_path):
    c = tiny_config(fmt)
    c.model.kwargs["nf"] = 16                       # wrong widths
    c.model.kwargs["progressive_input"] = "none"    # no input pyramid: the pyramid's tensors are unexpected
    with pytest.raises(CheckpointMismatch) as err:
        import_checkpoint(fmt, ckpts[fmt], c, str(tmp_path / "run"))
    msg = str(err.value)
    prefix = "module.all_modules." if fmt == "cld_sgm" else "score_fn.all_modules."
    assert "unexpected" in msg and "wrong shape" in msg and prefix in msg
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_psld_extra_tensor_outside_the_networks_is_listed(ckpts, tmp_path):
    obj = load_torch_checkpoint(ckpts["psld"])
    obj["state_dict"]["criterion.weights"] = np.zeros(3, np.float32)
    path = str(tmp_path / "extra.ckpt")
    torch_save(obj, path)
    with pytest.raises(CheckpointMismatch, match=r"unexpected \(1\): criterion\.weights"):
        import_checkpoint("psld", path, tiny_config("psld"), str(tmp_path / "run"))


def test_psld_file_of_another_layout_is_refused(ckpts, tmp_path):
    obj = load_torch_checkpoint(ckpts["cld_sgm"])          # a run_lib file where a Lightning file is expected
    path = str(tmp_path / "other.ckpt")
    torch_save(obj, path)
    with pytest.raises(CheckpointMismatch, match="not a PSLD .*'state_dict'"):
        import_checkpoint("psld", path, tiny_config("psld"), str(tmp_path / "run"))


@pytest.mark.parametrize("fmt,family,match", [("cld_sgm", "vp", "family.name='cld'"),
                                              ("psld", "cld", "family.name='psld'")])
def test_wrong_family_is_refused_before_reading(fmt, family, match, tmp_path):
    c = tiny_config(fmt)
    c.family = configs.family_config(family)
    with pytest.raises(ValueError, match=match):
        import_checkpoint(fmt, __file__, c, str(tmp_path / "run"))   # any existing file: refused before reading


@pytest.mark.parametrize("fmt,config_file,which,size", [
    ("cld_sgm", "cifar10_cld_ncsnpp.py", "cifar10", 32), ("cld_sgm", "celebahq256_cld.py", "celebahq256", 256),
    ("psld", "cifar10_psld_ncsnpp.py", "cifar10", 32)])
def test_published_networks_map_onto_the_configs(fmt, config_file, which, size):
    """The state-dict keys and shapes of the published networks (measured from the reference code: CLD-SGM
    CIFAR-10 107,593,987 and CelebA-HQ 256 65,466,371 parameters, PSLD CIFAR-10 97,627,910) map one to one onto
    the library's configs with the peer's channels (shapes only: broadcast views stand in for the weights)."""
    import json

    from diffusion_jax.interop.ncsnpp_weights import ncsnpp_from_torch
    from diffusion_jax.training.setup import build_experiment

    gold = PEERS[fmt]["gold"]
    config = configs.load_config(str(Path(__file__).parents[1] / "configs" / config_file))
    config.model.peer = fmt
    exp = build_experiment(config, (size, size, 3))
    sd = {k: np.broadcast_to(np.float32(0), tuple(s)) for k, s in json.loads(str(gold[f"spec_{which}"]))}
    prefix = "module.all_modules." if fmt == "cld_sgm" else "all_modules."
    params = ncsnpp_from_torch(sd, exp.net, (size, size), prefix=prefix)
    n = sum(int(np.prod(np.shape(v))) for v in jax.tree_util.tree_leaves(params))
    assert n == int(gold[f"count_{which}"])


@pytest.mark.parametrize("eps", [1e-9, 1e-6])
def test_cld_sgm_velocity_score_formula_with_its_numerical_eps(eps):
    """CLD-SGM's mixed velocity score -v / S_vv - o / l22 with S = Sigma_t + eps I (float64 from the library's
    covariance), for both published regularisers (CIFAR-10 1e-9, CelebA-HQ 1e-6), on a constant network output;
    at t = 1e-3 the two differ by far more than the tolerance, so the knob is exercised."""
    from diffusion_jax.interop import make_peer_preconditioner
    from diffusion_jax.param.roots import square_root
    from diffusion_jax.sdes import families

    sde = families.make("cld", beta=4.0, m_inv=4.0, init_gamma=0.04)
    sqrt = square_root(sde, "L")
    model = configs.digits("cld").model
    model.kwargs = {"embedding_type": "positional"}
    model.mixed_score = True
    model.peer_numerical_eps = eps
    pre = make_peer_preconditioner("cld_sgm", sde, sqrt, model)
    o = 0.7
    net = lambda x, c, **kw: jnp.full(x.shape[:3] + (1,), o)              # noqa: E731
    u = jnp.asarray(np.random.default_rng(0).standard_normal((3, 2, 2, 1, 2)), jnp.float32)
    t = jnp.asarray([1e-3, 0.1, 1.0], jnp.float32)
    score = np.asarray(score_from_eps(sde, pre.eps(net, u, t), sqrt(t)[:, None, None, None]))[..., 1]
    cov = np.stack([sde.covariance_np(float(s)) for s in np.asarray(t)])
    v = np.asarray(u, np.float64)[..., 1]

    def expected(e):
        sxx, sxv, svv = cov[:, 0, 0] + e, cov[:, 0, 1], cov[:, 1, 1] + e
        l22 = np.sqrt((sxx * svv - sxv ** 2) / sxx)
        return -v / svv[:, None, None, None] - o / l22[:, None, None, None]

    np.testing.assert_allclose(score, expected(eps), rtol=1e-4, atol=1e-5)
    other = expected(1e-6 if eps == 1e-9 else 1e-9)
    assert np.max(np.abs(other[0] - expected(eps)[0])) > 100 * (1e-5 + 1e-4 * np.max(np.abs(other[0])))
