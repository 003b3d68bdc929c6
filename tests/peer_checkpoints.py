"""Peer checkpoints (score_sde_pytorch, CLD-SGM, PSLD) rebuilt at test time from their golden .npz fixtures.

No checkpoint file is tracked in git. Each golden file (tests/fixtures/make_<format>_*.py, run once with the
reference code and torch) stores the key list and shapes of the reference network's state dict (``spec``,
JSON) and the seeds its weights were drawn with; the weights are regenerated here with the generating script's
own ``random_weights`` and written in the peer's layout by :func:`torch_format.torch_save`. The generating
scripts checked that the rebuilt file and the reference's own ``torch.save`` file load to identical objects
through the library's restricted unpickler.

Layouts (what the peers' training code saves):

* score_sde_pytorch / CLD-SGM (``run_lib`` / ``util.checkpoint.save_checkpoint``):
  ``{'optimizer': Adam.state_dict(), 'model': DDP/DataParallel(model).state_dict() ('module.' keys),
  'ema': {'decay', 'num_updates', 'shadow_params': [trainable parameters in order]}, 'step': int}``.
* PSLD (PyTorch Lightning 1.9 ``ModelCheckpoint`` of ``SDEWrapper``): ``{'epoch', 'global_step',
  'pytorch-lightning_version', 'state_dict': {'score_fn.*', 'ema_score_fn.*'}, 'loops', 'callbacks',
  'optimizer_states': [Adam.state_dict()], 'lr_schedulers': [LambdaLR.state_dict()]}``; the EMA network is
  the ``ema_score_fn`` module, updated by the ``EMAWeightUpdate`` callback (which has no state of its own).
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures"))
from make_ncsnpp_golden import random_weights  # noqa: E402
from torch_format import state_dict, torch_save  # noqa: E402


def spec_of(gold) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(s)) for k, s in json.loads(str(gold["spec"]))]


def trainable(spec) -> list[str]:
    """The keys ``model.parameters()`` yields with requires_grad: every one but the frozen Fourier ``W``."""
    return [k for k, s in spec if not (k.endswith(".W") and len(s) == 1)]


def ema_shadow(weights: dict, keys: list[str], seed: int) -> list[np.ndarray]:
    """EMA shadow parameters as the scripts made them: the weights plus float32(0.01 N(0, 1)), in order."""
    rng = np.random.default_rng(seed)
    return [weights[k] + (0.01 * rng.standard_normal(weights[k].shape)).astype(np.float32) for k in keys]


def adam_state(n: int, lr: float = 2e-4, weight_decay: float | int = 0, scheduled: bool = False) -> dict:
    """``torch.optim.Adam(params, lr).state_dict()`` before any step (torch 2.13's param-group fields);
    ``scheduled``: an LR scheduler was attached (it adds ``initial_lr``)."""
    group = dict(lr=lr, betas=(0.9, 0.999), eps=1e-08, weight_decay=weight_decay, amsgrad=False, maximize=False,
                 foreach=None, capturable=False, differentiable=False, fused=None, decoupled_weight_decay=False)
    if scheduled:
        group["initial_lr"] = lr
    group["params"] = list(range(n))
    return {"state": {}, "param_groups": [group]}


def score_sde_checkpoint(gold, path: str) -> str:
    """score_sde_pytorch's checkpoint of the tiny VP NCSN++ (tests/fixtures/make_score_sde_checkpoint.py)."""
    spec = spec_of(gold)
    w = random_weights(spec, int(gold["seed_weights"]))
    keys = trainable(spec)
    sigmas = np.exp(np.linspace(np.log(float(gold["sigma_max"])), np.log(float(gold["sigma_min"])),
                                int(gold["num_scales"])))
    model = state_dict([("module.sigmas", sigmas)] + [(k, w[k]) for k, _ in spec])
    ema = {"decay": float(gold["ema_rate"]), "num_updates": 0,
           "shadow_params": ema_shadow(w, keys, int(gold["seed_ema"]))}
    torch_save({"optimizer": adam_state(len(spec)), "model": model, "ema": ema, "step": int(gold["step"])}, path)
    return path


def cld_sgm_checkpoint(gold, path: str) -> str:
    """CLD-SGM's checkpoint (util/checkpoint.save_checkpoint) of the tiny CLD NCSN++
    (tests/fixtures/make_cld_sgm_golden.py): DDP keys ``module.all_modules.*``, no buffers."""
    spec = spec_of(gold)
    w = random_weights(spec, int(gold["seed_weights"]))
    keys = trainable(spec)
    model = state_dict([(k, w[k]) for k, _ in spec])
    ema = {"decay": float(gold["ema_rate"]), "num_updates": 0,
           "shadow_params": ema_shadow(w, keys, int(gold["seed_ema"]))}
    torch_save({"optimizer": adam_state(len(spec), weight_decay=0.0), "model": model, "ema": ema,
                "step": int(gold["step"])}, path)
    return path


def psld_checkpoint(gold, path: str) -> str:
    """PSLD's Lightning checkpoint of the tiny PSLD NCSN++ (tests/fixtures/make_psld_golden.py)."""
    spec = spec_of(gold)                    # the score network's own keys (all_modules.*)
    w = random_weights(spec, int(gold["seed_weights"]))
    keys = [k for k, _ in spec]
    shadow = dict(zip(trainable(spec), ema_shadow(w, trainable(spec), int(gold["seed_ema"]))))
    ema_w = {k: shadow.get(k, w[k]) for k in keys}
    sd = state_dict([("score_fn." + k, w[k]) for k in keys] + [("ema_score_fn." + k, ema_w[k]) for k in keys])
    step, epoch = int(gold["step"]), int(gold["epoch"])
    ckpt_cb = ("ModelCheckpoint{'monitor': 'loss', 'mode': 'min', 'every_n_train_steps': 0, 'every_n_epochs': 1, "
               "'train_time_interval': None}")
    obj = {
        "epoch": epoch, "global_step": step, "pytorch-lightning_version": "1.9.0", "state_dict": sd,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {
            "total": {"ready": epoch + 1, "started": epoch + 1, "processed": epoch, "completed": epoch},
            "current": {"ready": epoch + 1, "started": epoch + 1, "processed": epoch, "completed": epoch}}}},
        "callbacks": {ckpt_cb: {"monitor": "loss", "best_model_score": np.array(0.0201, np.float32),
                                "best_model_path": "checkpoints/psld-epoch=2349-loss=0.0201.ckpt",
                                "current_score": np.array(0.0201, np.float32), "dirpath": "checkpoints",
                                "best_k_models": {}, "kth_best_model_path": "", "kth_value": np.array(np.inf, np.float32),
                                "last_model_path": ""}},
        "optimizer_states": [adam_state(len(keys), scheduled=True)],
        "lr_schedulers": [{"base_lrs": [0.0002], "last_epoch": step, "_step_count": step + 1, "_is_initial": False,
                           "_get_lr_called_within_step": False, "_last_lr": [0.0002], "lr_lambdas": [None]}],
    }
    torch_save(obj, path)
    return path


BUILDERS = {"score_sde": score_sde_checkpoint, "cld_sgm": cld_sgm_checkpoint, "psld": psld_checkpoint}


def assert_same(a, b, path: str = "") -> None:
    """``a`` and ``b`` (loaded checkpoints) are the same nested objects: container types, key order, values,
    array dtypes, shapes and bits."""
    if isinstance(a, dict):
        assert type(a) is type(b) and list(a) == list(b), f"{path}: {type(a)} {list(a)[:4]} vs {type(b)} {list(b)[:4]}"
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{path}: {type(a)} vs {type(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, f"{path}: array meta"
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), f"{path}: values"
    else:
        assert type(a) is type(b) and a == b, f"{path}: {a!r} vs {b!r}"


if __name__ == "__main__":
    # python tests/peer_checkpoints.py FORMAT GOLDEN.npz REFERENCE_SAVED.pth: the rebuilt file loads to the
    # same objects as the reference's own torch.save file (run by the generating scripts' instructions).
    import tempfile
    from diffusion_jax.evaluation.torch_pickle import load_torch_checkpoint
    fmt, golden, saved = sys.argv[1:4]
    with tempfile.TemporaryDirectory() as d:
        rebuilt = BUILDERS[fmt](np.load(golden), os.path.join(d, "rebuilt"))
        assert_same(load_torch_checkpoint(saved), load_torch_checkpoint(rebuilt))
    print(f"{fmt}: {saved} and the file rebuilt from {golden} load to identical objects")


def check_samples_and_bpd(workdir: str, out_dir) -> None:
    """An imported run samples (gDDIM and Euler-Maruyama at NFE 3: finite fd-pixels) and gives a finite,
    positive bits/dim (Hutchinson trace) through the same programs as a trained run."""
    from diffusion_jax.apps import bench_nfe, bpd
    res = bench_nfe.run(workdir, samplers="gddim,euler_maruyama", nfes="3", metric="fd-pixels", n_samples=4,
                        out=os.path.join(str(out_dir), "bench"), floor_split=None, save_samples=False,
                        verbose=False)
    rows = bench_nfe.read_results(res["csv"])
    assert {r["sampler"] for r in rows} >= {"gddim", "euler_maruyama"}
    assert all(np.isfinite(float(r["value"])) for r in rows)
    s = bpd.run(workdir, n=2, split="test", trace="hutchinson", t_eps=1e-3, batch=2, rtol=1e-2, atol=1e-2,
                out=os.path.join(str(out_dir), "bpd.json"), verbose=False)
    assert np.isfinite(s["bpd_mean"]) and s["bpd_mean"] > 0
