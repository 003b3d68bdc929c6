"""Run configurations (ml_collections), score_sde style: ``configs/<name>.py`` call these builders.

Every field is overridable on the command line, e.g. ``--config.training.batch_size=256``.
:func:`validate` checks a config before anything is compiled or any data is read.
"""
from __future__ import annotations

import ml_collections

from diffusion_jax.sdes.families import FAMILIES

DATASETS = ("toy2d", "digits", "cifar10", "celeb_a_hq")
TOY_SETS = ("checkerboard", "swiss_roll", "ring8", "gmm")
OPTIMIZERS = ("adam", "adamw")
DTYPES = ("float32", "bfloat16")

# Family shorthands used in config names: cdhold3 = cdhold with n = 3.
_FAMILY_SHORT = {"cdhold3": ("cdhold", {"n": 3}), "cdhold4": ("cdhold", {"n": 4})}


def family_config(short: str, **params) -> ml_collections.ConfigDict:
    name, base = _FAMILY_SHORT.get(short, (short, {}))
    return ml_collections.ConfigDict({"name": name, "params": {**base, **params}})


#: force-field ODE families (diffusion_jax.fields.family): ODE samplers only
FIELD_FAMILIES = ("pfgm", "pfgmpp", "radial_tanh", "radial_exp")


def field_model(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Settings for a force-field family: the EDM preconditioning in eps form (mixed score with c_out:
    D = c_skip u + c_out F), Heun in the noise level (edm_heun) at NFE 35 (18 steps), evaluated at 10/20/35."""
    c.model.mixed_score = True
    c.model.c_out = True
    c.sampling.method = "edm_heun"
    c.sampling.nfe = 35
    c.sampling.eval_nfe = (10, 20, 35)
    return c


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.family = family_config("cld")
    c.data = ml_collections.ConfigDict(dict(
        dataset="toy2d", toy_name="checkerboard", data_dir="", manual_dir="", split="train",
        eval_split="test", image_size=0, random_flip=False, sigma_data=0.5))
    c.model = ml_collections.ConfigDict(dict(
        name="mlp", kwargs=ml_collections.ConfigDict({"hidden": 256, "depth": 3}), K="R",
        mixed_score=False, c_out=False, dtype="float32"))
    c.training = ml_collections.ConfigDict(dict(
        batch_size=256, num_steps=4000, objective="hsm", weighting="eps", t_eps=1e-5, log_every=100,
        ckpt_every=1000, keep=3, sample_every=0, async_checkpoints=True))
    c.optim = ml_collections.ConfigDict(dict(
        optimizer="adam", lr=1e-3, warmup=100, grad_clip=1.0, weight_decay=0.0, b1=0.9, b2=0.999,
        eps=1e-8, decay_to=0.1))
    c.ema_rates = (0.999,)
    c.sampling = ml_collections.ConfigDict(dict(
        method="gddim", nfe=50, order=1, num_samples=64, eval_nfe=(10, 20, 50)))
    c.mesh = ml_collections.ConfigDict(dict(data=-1))     # -1: every device on the 'data' axis
    return c


def toy2d(family: str, toy_name: str = "checkerboard", **family_params) -> ml_collections.ConfigDict:
    c = base_config()
    c.family = family_config(family, **family_params)
    c.data.toy_name = toy_name
    c.data.sigma_data = 1.0
    c.training.batch_size = 512
    c.training.num_steps = 3000
    c.training.ckpt_every = 1000
    c.optim.lr = 2e-3
    c.sampling.num_samples = 2000
    return c


def digits(family: str, **family_params) -> ml_collections.ConfigDict:
    """sklearn's 8x8 digits (embedded, offline) with a small DDPM++ U-Net: minutes on 2 CPU cores."""
    c = base_config()
    c.family = family_config(family, **family_params)
    c.data.dataset = "digits"
    c.data.image_size = 8
    c.data.sigma_data = 0.5
    c.model.name = "ddpmpp"
    c.model.kwargs = ml_collections.ConfigDict(dict(
        nf=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0))
    c.training.batch_size = 128
    c.training.num_steps = 3000
    c.training.log_every = 50
    c.training.ckpt_every = 500
    c.training.sample_every = 1000
    c.optim.lr = 2e-3
    c.optim.warmup = 200
    c.ema_rates = (0.99, 0.999)
    c.sampling.num_samples = 256
    return c


def cifar10(family: str, **family_params) -> ml_collections.ConfigDict:
    """CIFAR-10 with score_sde's DDPM++ (cont.) network and optimiser (paper scale)."""
    c = base_config()
    c.family = family_config(family, **family_params)
    c.data.dataset = "cifar10"
    c.data.image_size = 32
    c.data.random_flip = True
    c.model.name = "ddpmpp"
    c.model.kwargs = ml_collections.ConfigDict(dict(
        nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4, attn_resolutions=(16,), dropout=0.1))
    c.training.batch_size = 128
    c.training.num_steps = 1_300_000
    c.training.log_every = 100
    c.training.ckpt_every = 10_000
    c.training.sample_every = 50_000
    c.optim.lr = 2e-4
    c.optim.warmup = 5000
    c.optim.decay_to = 1.0              # constant learning rate after warm-up, as score_sde
    c.ema_rates = (0.9999,)
    c.sampling.num_samples = 64
    return c


def celebahq256(family: str, **family_params) -> ml_collections.ConfigDict:
    """CelebA-HQ 256 (tfds manual download) with the 256-px DDPM++ layout of score_sde."""
    c = cifar10(family, **family_params)
    c.data.dataset = "celeb_a_hq"
    c.data.image_size = 256
    c.model.kwargs = ml_collections.ConfigDict(dict(
        nf=128, ch_mult=(1, 1, 2, 2, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.0))
    c.training.batch_size = 64
    c.training.num_steps = 2_400_000
    c.optim.lr = 2e-4
    c.ema_rates = (0.999,)
    c.sampling.num_samples = 16
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    """Raise ``ValueError`` naming the fix for any bad field (before compiling or reading data)."""
    if c.family.name not in FAMILIES:
        raise ValueError(f"unknown family {c.family.name!r} (config.family.name); "
                         f"known: {', '.join(sorted(FAMILIES))}")
    if c.family.name in FIELD_FAMILIES and (c.sampling.method == "euler_maruyama" or (
            c.sampling.method in ("gddim", "sscs") and c.sampling.get("lam", 1.0 if c.sampling.method == "sscs"
                                                                        else 0.0) > 0)):
        raise ValueError(f"{c.family.name} is a force-field ODE model: config.sampling.method="
                         f"{c.sampling.method!r} adds Gaussian noise; use 'edm_heun', 'heun', 'dopri5' or 'gddim'")
    if c.data.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {c.data.dataset!r} (config.data.dataset); known: {DATASETS}")
    if c.data.dataset == "toy2d" and c.data.toy_name not in TOY_SETS:
        raise ValueError(f"unknown toy set {c.data.toy_name!r} (config.data.toy_name); known: {TOY_SETS}")
    from diffusion_jax.models import MODELS
    if c.model.name not in MODELS:
        raise ValueError(f"unknown model {c.model.name!r} (config.model.name); known: {sorted(MODELS)}")
    if c.data.dataset == "toy2d" and c.model.name != "mlp":
        raise ValueError("toy 2-D data needs config.model.name='mlp'")
    if c.data.dataset != "toy2d" and c.model.name != "ddpmpp":
        raise ValueError(f"image data ({c.data.dataset}) needs config.model.name='ddpmpp'")
    if c.model.dtype not in DTYPES:
        raise ValueError(f"config.model.dtype must be one of {DTYPES}, got {c.model.dtype!r}")
    if c.model.get("c_out", False) and not c.model.mixed_score:
        raise ValueError("config.model.c_out=True scales the residual around the mixed score: "
                         "also set config.model.mixed_score=True")
    if c.model.K not in ("R", "L"):
        raise ValueError(f"config.model.K must be 'R' (gDDIM) or 'L' (Cholesky), got {c.model.K!r}")
    if c.optim.optimizer not in OPTIMIZERS:
        raise ValueError(f"config.optim.optimizer must be one of {OPTIMIZERS}, got {c.optim.optimizer!r}")
    t = c.training
    from diffusion_jax.losses import OBJECTIVES, WEIGHTINGS
    if t.objective not in OBJECTIVES:
        raise ValueError(f"unknown training objective {t.objective!r} (config.training.objective); "
                         f"choose one of {OBJECTIVES}")
    if t.weighting not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {t.weighting!r} (config.training.weighting); "
                         f"choose one of {WEIGHTINGS}")
    if not (t.t_eps > 0):
        raise ValueError(f"config.training.t_eps must be positive, got {t.t_eps}")
    for name in ("batch_size", "num_steps", "log_every", "ckpt_every", "keep"):
        if not (isinstance(t[name], int) and t[name] >= 1):
            raise ValueError(f"config.training.{name} must be a positive integer, got {t[name]!r}")
    if not (c.optim.lr > 0 and c.optim.grad_clip >= 0 and c.optim.warmup >= 0):
        raise ValueError("config.optim: need lr > 0, grad_clip >= 0 (0 = off) and warmup >= 0")
    if not all(0.0 < r < 1.0 for r in c.ema_rates):
        raise ValueError(f"config.ema_rates must lie in (0, 1), got {tuple(c.ema_rates)}")
