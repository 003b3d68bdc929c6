"""Run configurations (ml_collections), score_sde style: ``configs/<name>.py`` call these builders.

Every field is overridable on the command line, e.g. ``--config.training.batch_size=256``.
:func:`validate` checks every field the training loop and its periodic sampler read, before anything is
compiled, any data is read or anything is written; a bad value raises :class:`ConfigError` (a
``ValueError``) with a one-line message naming the field and the fix.

``training.n_steps_per_call`` = k runs k optimiser steps per compiled call (``lax.scan``; score_sde's
``n_jitted_steps``), so ``num_steps``, ``log_every``, ``ckpt_every`` and ``sample_every`` must be multiples
of k. ``sampling.{method, nfe, order, grid, num_samples}`` configure the periodic sample grids
(``sample_every`` > 0; at most 64 samples per grid). ``training.tensorboard``: process 0 also writes TensorBoard
summaries (loss, gradient norm, steps/s, sample images) with clu, which imports TensorFlow (about 4 s of
start-up); ``metrics.csv`` and the log are written either way.
"""
from __future__ import annotations

import ml_collections

from diffusion_jax.sdes.families import FAMILIES

DATASETS = ("toy2d", "digits", "cifar10", "celeb_a_hq")
TOY_SETS = ("checkerboard", "swiss_roll", "ring8", "gmm")
OPTIMIZERS = ("adam", "adamw")
DTYPES = ("float32", "bfloat16")



class ConfigError(ValueError):
    """A bad configuration value (the message names the field and the fix, on one line)."""


# Family shorthands used in config names: cdhold3 = cdhold with n = 3.
_FAMILY_SHORT = {f"cdhold{n}": ("cdhold", {"n": n}) for n in (3, 4, 5, 6)}


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
        eval_split="test", random_flip=False, sigma_data=0.5))
    c.model = ml_collections.ConfigDict(dict(
        name="mlp", kwargs=ml_collections.ConfigDict({"hidden": 256, "depth": 3}), K="R",
        mixed_score=False, c_out=False, dtype="float32", time_input="1000t"))
    c.training = ml_collections.ConfigDict(dict(
        batch_size=256, num_steps=4000, objective="hsm", weighting="eps", t_eps=1e-5, log_every=100,
        ckpt_every=1000, keep=3, sample_every=0, async_checkpoints=True, n_steps_per_call=1,
        tensorboard=True))
    c.optim = ml_collections.ConfigDict(dict(
        optimizer="adam", lr=1e-3, warmup=100, grad_clip=1.0, weight_decay=0.0, b1=0.9, b2=0.999,
        eps=1e-8, decay_to=0.1))
    c.ema_rates = (0.999,)
    c.sampling = ml_collections.ConfigDict(dict(
        method="gddim", nfe=50, order=1, grid="uniform", num_samples=64))
    c.mesh = ml_collections.ConfigDict(dict(data=-1))     # -1: every device on the 'data' axis
    return c


# Sections whose fields say how a run is trained, kept and laid out on devices. A field added to them after a
# run was written (e.g. training.tensorboard) takes its default when the run's saved config is read back; the
# other sections are left as saved (model.kwargs and family are free-form, and a missing sampling option means
# "the method's default", which a filled-in value would override).
RUN_SETTINGS = ("training", "optim", "mesh")


def complete_saved(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` (a saved run's) with the :data:`RUN_SETTINGS` fields it predates set to their defaults
    (:func:`base_config`); fields it has are kept. Modifies and returns ``config``."""
    defaults = base_config()
    for section in RUN_SETTINGS:
        if section not in config:
            config[section] = defaults[section]
            continue
        for name, value in defaults[section].items():
            if name not in config[section]:
                config[section][name] = value
    return config


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
    c.model.kwargs = ml_collections.ConfigDict(dict(
        nf=128, ch_mult=(1, 1, 2, 2, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.0))
    c.training.batch_size = 64
    c.training.num_steps = 2_400_000
    c.optim.lr = 2e-4
    c.ema_rates = (0.999,)
    c.sampling.num_samples = 16
    return c


# score_sde's NCSN++ (cont.) CIFAR-10 layout ("deep": 8 blocks per level), the network of CLD-SGM, PSLD,
# gDDIM's CLD model and the CD-HOLD authors' code.
NCSNPP_CIFAR10 = dict(
    nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=8, attn_resolutions=(16,), dropout=0.1,
    resblock_type="biggan", resamp_with_conv=True, fir=True, fir_kernel=(1, 3, 3, 1), skip_rescale=True,
    progressive="none", progressive_input="residual", progressive_combine="sum",
    embedding_type="fourier", fourier_scale=16.0, init_scale=0.0)


def cifar10_ncsnpp(family: str, **family_params) -> ml_collections.ConfigDict:
    """CIFAR-10 with NCSN++ (deep, Fourier features of log t) at the phase-space papers' scale:
    Adam 2e-4, warm-up 5000, clip 1, EMA 0.9999, batch 128, 800k steps. Configs adjust per source."""
    c = cifar10(family, **family_params)
    c.model.name = "ncsnpp"
    c.model.kwargs = ml_collections.ConfigDict(dict(NCSNPP_CIFAR10))
    c.model.time_input = "log_t"            # Fourier features of log t, as CLD-SGM feeds them
    c.training.num_steps = 800_000
    return c


def cifar10_cdhold_ncsnpp(n: int) -> ml_collections.ConfigDict:
    """CIFAR-10, CD-HOLD of order n, NCSN++ (deep): the CD-HOLD authors' public code (its CIFAR-10 setting).

    Matches: NCSN++ nf 128, ch_mult (1, 2, 2, 2), 8 blocks, attention at 16, FIR (1, 3, 3, 1), BigGAN blocks,
    residual input pyramid (sum), Fourier features, dropout 0.1, mixed score; Adam 2e-4, warm-up 5000, clip 1,
    EMA 0.9999, 800k steps, batch 128; Euler-Maruyama sampling (order n = 3..6 reported to work on CIFAR-10).

    Deliberate differences: the family keeps the library's time scale (beta 4, T = 1, so B(T) = 4) where the
    authors integrate to T = 5 in their time units; eps w.r.t. the Cholesky factor K = L_t (for every n: gDDIM's
    R_t table did not finish building within minutes on CPU for n = 5, 6); Fourier features of log t; the
    input is scaled per coordinate by c_in.
    """
    c = cifar10_ncsnpp(f"cdhold{n}")
    c.model.mixed_score = True
    c.model.K = "L"
    c.sampling.method = "euler_maruyama"
    c.sampling.nfe = 1000
    return c


def celebahq256_ncsnpp(family: str, **family_params) -> ml_collections.ConfigDict:
    """CelebA-HQ 256 with CLD-SGM's 256-px network: NCSN++ code in its DDPM++ setting (BigGAN blocks, no
    FIR, no pyramids, positional embedding), nf 128, ch_mult (1, 1, 2, 2, 2, 2, 2), 2 blocks, attention at
    16, dropout 0.1; Adam 1e-4, clip 1, EMA 0.9999, batch 64, 320k steps."""
    c = celebahq256(family, **family_params)
    c.model.name = "ncsnpp"
    c.model.kwargs = ml_collections.ConfigDict(dict(
        NCSNPP_CIFAR10, ch_mult=(1, 1, 2, 2, 2, 2, 2), num_res_blocks=2, fir=False, progressive_input="none",
        embedding_type="positional"))
    c.model.time_input = "1000t"
    c.training.num_steps = 320_000
    c.optim.lr = 1e-4
    c.ema_rates = (0.9999,)
    return c


def load_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """The config of a file ``configs/<name>.py`` (its ``get_config()``) with ``--config.a.b=value`` overrides.

    A value is read as a Python literal (``3``, ``0.5``, ``True``, ``'(1, 2)'``) and otherwise kept as a string;
    the field must exist (a typo is an error naming the known fields), and the value must have its type (an
    int may fill a float field). Validation (:func:`validate`) runs on the result.
    """
    import ast
    import importlib.util
    import os

    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} not found: pass --config configs/<name>.py")
    spec = importlib.util.spec_from_file_location(f"_diffusion_jax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config()")
    config = module.get_config()
    for item in overrides:
        if not item.startswith("--config.") or "=" not in item:
            raise ConfigError(f"unrecognised argument {item!r}: overrides look like --config.training.batch_size=256")
        key, text = item[len("--config."):].split("=", 1)
        parent, name = config, key
        if "." in key:
            head, name = key.rsplit(".", 1)
            for part in head.split("."):
                if part not in parent:
                    raise ConfigError(f"--config.{key}: no field {part!r}; known: {sorted(parent.keys())}")
                parent = parent[part]
        if name not in parent:
            raise ConfigError(f"--config.{key}: no field {name!r}; known: {sorted(parent.keys())}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = {"true": True, "false": False}.get(text.lower(), text)
        old = parent[name]
        if isinstance(old, (tuple, list)) and not isinstance(value, (tuple, list)):
            value = (value,)
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if old is not None and not isinstance(value, type(old)) and not (
                isinstance(old, (tuple, list)) and isinstance(value, (tuple, list))):
            raise ConfigError(f"--config.{key}={text}: expected a {type(old).__name__} like {old!r}")
        parent[name] = tuple(value) if isinstance(old, tuple) else value
    validate(config)
    return config


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate(c: ml_collections.ConfigDict) -> None:
    """Raise :class:`ConfigError` naming the field and the fix for any bad value.

    Pure Python (no JAX backend is touched), so it runs before ``jax.distributed.initialize``, before
    anything is compiled and before anything is written to the workdir. The check that needs the device
    count (batch size divisible by the global number of devices) is in ``training.setup.make_mesh``.
    """
    def fail(message: str):
        raise ConfigError(message)

    if c.family.name not in FAMILIES:
        fail(f"unknown family {c.family.name!r} (config.family.name); known: {', '.join(sorted(FAMILIES))}")
    if c.family.name in FIELD_FAMILIES and (c.sampling.method == "euler_maruyama" or (
            c.sampling.method in ("gddim", "sscs") and c.sampling.get("lam", 1.0 if c.sampling.method == "sscs"
                                                                        else 0.0) > 0)):
        fail(f"{c.family.name} is a force-field ODE model: config.sampling.method="
             f"{c.sampling.method!r} adds Gaussian noise; use 'edm_heun', 'heun', 'dopri5' or 'gddim'")
    if c.data.dataset not in DATASETS:
        fail(f"unknown dataset {c.data.dataset!r} (config.data.dataset); known: {DATASETS}")
    if c.data.dataset == "toy2d" and c.data.toy_name not in TOY_SETS:
        fail(f"unknown toy set {c.data.toy_name!r} (config.data.toy_name); known: {TOY_SETS}")
    if not (c.data.sigma_data > 0):
        fail(f"config.data.sigma_data must be positive, got {c.data.sigma_data!r}")
    from diffusion_jax.models import MODELS
    if c.model.name not in MODELS:
        fail(f"unknown model {c.model.name!r} (config.model.name); known: {sorted(MODELS)}")
    if c.data.dataset == "toy2d" and c.model.name != "mlp":
        fail("toy 2-D data needs config.model.name='mlp'")
    if c.data.dataset != "toy2d" and c.model.name not in ("ddpmpp", "ncsnpp"):
        fail(f"image data ({c.data.dataset}) needs config.model.name='ddpmpp' or 'ncsnpp'")
    if c.model.dtype not in DTYPES:
        fail(f"config.model.dtype must be one of {DTYPES}, got {c.model.dtype!r}")
    if c.model.get("c_out", False) and not c.model.mixed_score:
        fail("config.model.c_out=True scales the residual around the mixed score: "
             "also set config.model.mixed_score=True")
    if c.model.K not in ("R", "L"):
        fail(f"config.model.K must be 'R' (gDDIM) or 'L' (Cholesky), got {c.model.K!r}")
    if c.optim.optimizer not in OPTIMIZERS:
        fail(f"config.optim.optimizer must be one of {OPTIMIZERS}, got {c.optim.optimizer!r}")
    if not _int(c.seed):
        fail(f"config.seed must be an integer, got {c.seed!r}")
    t = c.training
    from diffusion_jax.training.losses import OBJECTIVES, WEIGHTINGS
    if t.objective not in OBJECTIVES:
        fail(f"unknown training objective {t.objective!r} (config.training.objective); choose one of {OBJECTIVES}")
    if t.weighting not in WEIGHTINGS:
        fail(f"unknown loss weighting {t.weighting!r} (config.training.weighting); choose one of {WEIGHTINGS}")
    if not (t.t_eps > 0):
        fail(f"config.training.t_eps must be positive, got {t.t_eps}")
    for name in ("batch_size", "num_steps", "log_every", "ckpt_every", "keep", "n_steps_per_call"):
        if not (_int(t[name]) and t[name] >= 1):
            fail(f"config.training.{name} must be a positive integer, got {t[name]!r}")
    if not (_int(t.sample_every) and t.sample_every >= 0):
        fail(f"config.training.sample_every must be an integer >= 0 (0: no periodic samples), "
             f"got {t.sample_every!r}")
    for name in ("async_checkpoints", "tensorboard"):
        if not isinstance(t[name], bool):
            fail(f"config.training.{name} must be True or False, got {t[name]!r}")
    k = t.n_steps_per_call
    for name in ("num_steps", "log_every", "ckpt_every", "sample_every"):
        if t[name] % k:
            fail(f"config.training.{name}={t[name]} is not a multiple of config.training.n_steps_per_call={k} "
                 f"(the loop logs, saves and samples between compiled calls of {k} steps)")
    o = c.optim
    if not (o.lr > 0 and o.grad_clip >= 0 and _int(o.warmup) and o.warmup >= 0):
        fail("config.optim: need lr > 0, grad_clip >= 0 (0 = off) and an integer warmup >= 0, got "
             f"lr={o.lr!r}, grad_clip={o.grad_clip!r}, warmup={o.warmup!r}")
    if not (0.0 <= o.b1 < 1.0 and 0.0 <= o.b2 < 1.0 and o.eps > 0 and o.weight_decay >= 0):
        fail(f"config.optim: need 0 <= b1, b2 < 1, eps > 0 and weight_decay >= 0, got b1={o.b1!r}, "
             f"b2={o.b2!r}, eps={o.eps!r}, weight_decay={o.weight_decay!r}")
    if not (0.0 <= o.decay_to <= 1.0):
        fail(f"config.optim.decay_to must lie in [0, 1] (1: constant after warm-up), got {o.decay_to!r}")
    if not all(0.0 < r < 1.0 for r in c.ema_rates):
        fail(f"config.ema_rates must lie in (0, 1), got {tuple(c.ema_rates)}")
    if t.sample_every and not len(c.ema_rates):
        fail("config.training.sample_every > 0 samples with the EMA parameters: set config.ema_rates")
    if not (_int(c.mesh.data) and (c.mesh.data == -1 or c.mesh.data >= 1)):
        fail(f"config.mesh.data must be -1 (every device) or a positive integer, got {c.mesh.data!r}")
    _validate_sampling(c.sampling)


def sampling_options(s: ml_collections.ConfigDict) -> dict:
    """The sampler options of ``config.sampling`` that its method reads (order, grid)."""
    from diffusion_jax.samplers import METHOD_OPTIONS
    return {k: s[k] for k in ("order", "grid") if k in METHOD_OPTIONS.get(s.method, ()) and k in s}


def _validate_sampling(s: ml_collections.ConfigDict) -> None:
    """The periodic sampler's fields, by the samplers' own option rules (:func:`samplers.plan.check_options`)."""
    from diffusion_jax.samplers import DIFFRAX_ADAPTIVE, METHODS
    from diffusion_jax.samplers.plan import check_options
    fixed = tuple(m for m in METHODS if m not in DIFFRAX_ADAPTIVE)
    if s.method in DIFFRAX_ADAPTIVE:
        raise ConfigError(f"config.sampling.method={s.method!r} is adaptive (its NFE is data dependent and "
                          f"it cannot run inside the compiled periodic sampler); choose one of {', '.join(fixed)}")
    if s.method not in METHODS:
        raise ConfigError(f"unknown sampling method {s.method!r} (config.sampling.method); "
                          f"choose one of {', '.join(fixed)}")
    if not (_int(s.nfe) and s.nfe >= 1):
        raise ConfigError(f"config.sampling.nfe must be an integer >= 1, got {s.nfe!r}")
    from diffusion_jax.samplers import GRIDS, MAX_GDDIM_ORDER
    if not (_int(s.order) and 0 <= s.order <= MAX_GDDIM_ORDER):
        raise ConfigError(f"config.sampling.order (gddim multistep order) must be an integer in "
                          f"0..{MAX_GDDIM_ORDER}, got {s.order!r}")
    if s.grid not in GRIDS:
        raise ConfigError(f"unknown time grid {s.grid!r} (config.sampling.grid); choose one of {GRIDS}")
    try:
        check_options(s.method, s.nfe, sampling_options(s))
    except ValueError as e:
        raise ConfigError(f"config.sampling (method {s.method!r}, nfe {s.nfe}): {e}") from e
    if not (_int(s.num_samples) and s.num_samples >= 1):
        raise ConfigError(f"config.sampling.num_samples must be a positive integer, got {s.num_samples!r}")
