"""The NCSN++ configs: they validate, build, and their networks have the reference codes' parameter counts.

Reference counts, measured as sum(p.numel() for p in model.parameters()) on the reference PyTorch models:
  * score_sde_pytorch, configs/ve/cifar10_ncsnpp_deep_continuous.py:      107,587,075 (3 in, 3 out)
  * CLD-SGM (nv-tlabs/CLD-SGM) models/ncsnpp.py with configs/default_cifar10.txt + specific_cifar10.txt:
                                                                          107,593,987 (6 in, 3 out)
  * CLD-SGM with configs/default_celeba_paper.txt + specific_celeba_paper.txt (256 px):
                                                                           65,466,371 (6 in, 3 out)
(tests/fixtures/make_ncsnpp_golden.py re-measures the first; the CLD-SGM ones came from instantiating
``models.ncsnpp.NCSNpp`` of that repository with its two config files parsed as key = value.)
The library's CLD networks output eps for x and v (6 channels), 3 x 128 x 9 + 3 = 3459 parameters more.
"""
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.training import configs
from diffusion_jax.models import get_model
from diffusion_jax.training.setup import build_experiment

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
NAMES = ["cifar10_cld_ncsnpp", "cifar10_psld_ncsnpp", "cifar10_cld_gddim_ncsnpp", "cifar10_cdhold3_ncsnpp",
         "cifar10_cdhold4_ncsnpp", "cifar10_cdhold5_ncsnpp", "cifar10_cdhold6_ncsnpp", "celebahq256_cdhold3",
         "celebahq256_cld"]


def load(name):
    spec = importlib.util.spec_from_file_location(name, CONFIG_DIR / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def count(net, size):
    shapes = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, net.in_channels)),
                                             jnp.ones((1,)), train=False))
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))


@pytest.mark.parametrize("name", NAMES)
def test_config_builds(name):
    c = load(name)
    configs.validate(c)
    assert c.model.name == "ncsnpp"
    from diffusion_jax.data import data_shape
    exp = build_experiment(c, data_shape(c))
    k = exp.sde.order
    assert exp.net.in_channels == exp.net.out_channels == 3 * k
    assert exp.precond.time_input == c.model.time_input


@pytest.mark.parametrize("name,size,reference", [("cifar10_cld_ncsnpp", 32, 107_593_987),
                                                 ("celebahq256_cld", 256, 65_466_371)])
def test_cld_networks_match_cld_sgm_counts(name, size, reference):
    c = load(name)
    kwargs = dict(c.model.kwargs)
    assert count(get_model("ncsnpp", in_channels=6, out_channels=3, **kwargs), size) == reference
    assert count(get_model("ncsnpp", in_channels=6, out_channels=6, **kwargs), size) == reference + 3459


def test_unknown_time_input_is_refused_before_compiling():
    c = load("cifar10_cld_ncsnpp")
    c.model.time_input = "sigma"
    with pytest.raises(ValueError, match="config.model.time_input"):
        build_experiment(c, (32, 32, 3))
