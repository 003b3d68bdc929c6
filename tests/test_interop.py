"""Checkpoint import (diffusion_jax.interop): score_sde_pytorch VP checkpoints as library runs.

Fixtures (tests/fixtures/make_score_sde_checkpoint.py, run once with the reference code in a throw-away
torch venv): the recipe of a score_sde_pytorch checkpoint of a tiny VP NCSN++ on random weights (rebuilt in a
temporary directory by tests/peer_checkpoints.py; no checkpoint file is tracked), and the reference's own
score function (models.utils.get_score_fn, continuous VP) on its EMA weights.
"""
from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.training import configs
from diffusion_jax.interop import CheckpointMismatch, import_checkpoint
from diffusion_jax.evaluation.torch_pickle import UnsafeCheckpointError
from diffusion_jax.param import score_from_eps
from diffusion_jax.training.loop import load_run
from diffusion_jax.training.state import pick_ema

from peer_checkpoints import check_samples_and_bpd, score_sde_checkpoint

FIX = Path(__file__).parent / "fixtures"
GOLD = np.load(FIX / "score_sde_vp_tiny_golden.npz")


def tiny_config(data_dir: str = ""):
    c = configs.digits("vp")
    c.model.name = "ncsnpp"
    c.model.kwargs = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
                          fir=bool(GOLD["fir"]), progressive=str(GOLD["progressive"]),
                          progressive_input=str(GOLD["progressive_input"]),
                          embedding_type=str(GOLD["embedding_type"]))
    c.model.K = "L"
    c.data.data_dir = data_dir
    return c


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return score_sde_checkpoint(GOLD, str(tmp_path_factory.mktemp("ckpt") / "checkpoint_1234.pth"))


@pytest.fixture(scope="module")
def imported(tmp_path_factory, ckpt):
    root = tmp_path_factory.mktemp("interop")
    workdir = str(root / "run")
    import_checkpoint("score_sde", ckpt, tiny_config(str(root / "tfds")), workdir)
    return workdir


def test_imported_score_equals_reference_score_function(imported):
    exp, state = load_run(imported)
    assert int(state.step) == 1234
    key, ema = pick_ema(state)
    assert float(key) == float(GOLD["ema_rate"])
    x = np.transpose(GOLD["x"], (0, 2, 3, 1))[..., None]          # (batch, 8, 8, 1, k=1)
    t = jnp.asarray(GOLD["t"])
    eps_of = jax.jit(lambda p, u, t: exp.eps_fn(p)(u, t))
    eps = eps_of(ema, jnp.asarray(x), t)
    score = score_from_eps(exp.sde, eps, exp.sqrt(t)[:, None, None, None])
    ref = np.transpose(GOLD["score"], (0, 2, 3, 1))[..., None]
    std_ref = GOLD["std"].astype(np.float64)
    # eps units (the network's own scale): the reference's eps is -std * score, with its own std
    np.testing.assert_allclose(np.asarray(eps), -std_ref.reshape(-1, 1, 1, 1, 1) * ref, atol=1e-5, rtol=0)
    # score units. The reference computes std_t = sqrt(1 - exp(...)) in float32, which loses ~1e-4 of
    # relative accuracy at t = 1e-3 by cancellation; the library's std agrees with the float64 closed form,
    # so the reference's score is compared with its std replaced by the exact one.
    t64 = GOLD["t"].astype(np.float64)
    std_exact = np.sqrt(-np.expm1(-(0.1 * t64 + 0.5 * (20.0 - 0.1) * t64 ** 2)))
    std_lib = np.sqrt(np.asarray(exp.sde.covariance(t))[:, 0, 0].astype(np.float64))
    np.testing.assert_allclose(std_lib, std_exact, rtol=2e-6)
    ref_exact = ref * (std_ref / std_exact).reshape(-1, 1, 1, 1, 1)
    for i in range(len(t)):
        scale = float(np.max(np.abs(ref_exact[i])))
        assert float(np.max(np.abs(np.asarray(score[i]) - ref_exact[i]))) <= 1e-5 * max(scale, 1.0)
    # the raw (non-EMA) weights are in the state too and differ
    eps_raw = eps_of(state.params, jnp.asarray(x), t)
    assert float(jnp.max(jnp.abs(eps_raw - eps))) > 1e-3


def test_imported_run_samples_and_bpd(imported, tmp_path):
    check_samples_and_bpd(imported, tmp_path)


def test_missing_file_names_the_file_and_where_it_is_published(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint_<n>.pth.*score_sde_pytorch"):
        import_checkpoint("score_sde", str(tmp_path / "nope.pth"), tiny_config(), str(tmp_path / "run"))


def test_truncated_file_is_refused(tmp_path, ckpt):
    data = open(ckpt, "rb").read()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        import_checkpoint("score_sde", str(bad), tiny_config(), str(tmp_path / "run"))


def test_disallowed_global_is_refused_without_executing(tmp_path):
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"model": Evil()}, protocol=2))
    path = tmp_path / "evil.pth"
    path.write_bytes(buf.getvalue())
    with pytest.raises(UnsafeCheckpointError, match="system"):
        import_checkpoint("score_sde", str(path), tiny_config(), str(tmp_path / "run"))
    assert not marker.exists()


def test_other_architecture_lists_keys(tmp_path, ckpt):
    c = tiny_config()
    c.model.kwargs["nf"] = 16                                    # wrong widths
    c.model.kwargs["progressive_input"] = "none"                 # and no input pyramid
    with pytest.raises(CheckpointMismatch) as err:
        import_checkpoint("score_sde", ckpt, c, str(tmp_path / "run"))
    msg = str(err.value)
    assert "unexpected" in msg and "wrong shape" in msg and "module.all_modules." in msg
    assert not os.path.isdir(tmp_path / "run" / "checkpoints")


def test_unknown_format_and_wrong_family(tmp_path, ckpt):
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        import_checkpoint("onnx", ckpt, tiny_config(), str(tmp_path / "a"))
    c = tiny_config()
    c.family = configs.family_config("cld")
    with pytest.raises(ValueError, match="family.name='vp'"):
        import_checkpoint("score_sde", ckpt, c, str(tmp_path / "b"))
