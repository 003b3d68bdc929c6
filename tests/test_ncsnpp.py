"""NCSN++ (models/ncsnpp.py): parameter counts and outputs against score_sde's reference code.

Golden data: tests/fixtures/ncsnpp_golden.npz, written by tests/fixtures/make_ncsnpp_golden.py from
yang-song/score_sde_pytorch (see that script for how to regenerate it; the reference code is not in
this repository). Weights are regenerated here by the script's own ``random_weights`` from the stored
key list, so the fixture holds only keys, inputs and outputs.
"""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.interop.ncsnpp_weights import CheckpointMismatch, ncsnpp_from_torch
from diffusion_jax.models import get_model
import make_ncsnpp_flax_golden as make_flax_golden
import make_ncsnpp_golden as make_golden

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = np.load(FIXTURES / "ncsnpp_golden.npz")
CASES = list(make_golden.CASES)


def _count(**kwargs):
    net = get_model("ncsnpp", in_channels=3, out_channels=3, **kwargs)
    size = kwargs.pop("_size", 32)
    shapes = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)),
                                             jnp.ones((1,)), train=False))
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))


# Parameter counts of score_sde_pytorch's models, measured with
#   sum(p.numel() for p in model.parameters())
# on the reference configs (make_ncsnpp_golden.py stores them under counts/<config>):
#   ve/cifar10_ncsnpp_continuous       62,758,915
#   ve/cifar10_ncsnpp_deep_continuous 107,587,075
#   ve/celebahq_256_ncsnpp_continuous  65,574,549
#   vp/cifar10_ddpmpp_continuous       61,804,419
REFERENCE_COUNTS = {
    "cifar10_ncsnpp_continuous": (62_758_915, dict(num_res_blocks=4)),
    "cifar10_ncsnpp_deep_continuous": (107_587_075, dict(num_res_blocks=8)),
    "cifar10_ddpmpp_continuous": (61_804_419, dict(num_res_blocks=4, fir=False, progressive_input="none",
                                                    embedding_type="positional")),
}


@pytest.mark.parametrize("name", sorted(REFERENCE_COUNTS))
def test_parameter_count_matches_reference(name):
    count, kwargs = REFERENCE_COUNTS[name]
    assert int(GOLDEN[f"counts/{name}"]) == count
    assert _count(**kwargs) == count


def test_parameter_count_celebahq256_matches_reference():
    net = get_model("ncsnpp", in_channels=3, out_channels=3, ch_mult=(1, 1, 2, 2, 2, 2, 2), num_res_blocks=2,
                    progressive="output_skip", progressive_input="input_skip", dropout=0.0)
    shapes = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), jnp.zeros((1, 256, 256, 3)),
                                             jnp.ones((1,)), train=False))
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    assert n == int(GOLDEN["counts/celebahq_256_ncsnpp_continuous"]) == 65_574_549


def _case(case):
    opts = json.loads(str(GOLDEN[f"{case}/options"]))
    spec = [(k, tuple(s)) for k, s in json.loads(str(GOLDEN[f"{case}/spec"]))]
    weights = make_golden.random_weights(spec, seed=1000 + CASES.index(case))
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in opts.items()}
    net = get_model("ncsnpp", in_channels=3, out_channels=3, dropout=0.0, **kwargs)
    return net, weights


@pytest.mark.parametrize("case", CASES)
def test_output_matches_pytorch_reference(case):
    net, weights = _case(case)
    params = ncsnpp_from_torch(weights, net, (8, 8))
    x = np.transpose(GOLDEN[f"{case}/x"], (0, 2, 3, 1))
    t = GOLDEN[f"{case}/t"]
    # the reference feeds log(sigma) to Fourier features and the raw step to the positional embedding
    c_noise = np.log(t) if net.embedding_type == "fourier" else t
    out = jax.jit(lambda p, x, c: net.apply({"params": p}, x, c, train=False))(params, x, c_noise)
    ref = np.transpose(GOLDEN[f"{case}/out"], (0, 2, 3, 1))
    assert out.shape == ref.shape
    assert float(np.max(np.abs(ref))) > 0.5
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)


def test_conversion_lists_missing_extra_and_wrong_shape_keys():
    net, weights = _case("residual_positional")
    bad = dict(weights)
    first_conv = next(k for k in bad if k.endswith("Conv_0.weight"))
    bad[first_conv] = bad[first_conv][:, :-1]                 # wrong shape
    dropped = next(k for k in bad if "NIN_3.W" in k)
    del bad[dropped]                                          # missing
    bad["all_modules.999.Conv_0.weight"] = np.zeros((1,))     # extra
    with pytest.raises(CheckpointMismatch) as err:
        ncsnpp_from_torch(bad, net, (8, 8))
    msg = str(err.value)
    assert dropped in msg and "all_modules.999.Conv_0.weight" in msg and first_conv in msg
    # another architecture: the DDPM-block net's weights into the BigGAN net
    other = _case("ddpm_blocks")[1]
    with pytest.raises(CheckpointMismatch, match="missing"):
        ncsnpp_from_torch(other, net, (8, 8))


def test_bfloat16_compute_stays_close():
    net, weights = _case("skip_cat_fourier")
    params = ncsnpp_from_torch(weights, net, (8, 8))
    x = np.transpose(GOLDEN["skip_cat_fourier/x"], (0, 2, 3, 1))
    c = np.log(GOLDEN["skip_cat_fourier/t"])
    ref = np.transpose(GOLDEN["skip_cat_fourier/out"], (0, 2, 3, 1))
    out = net.clone(dtype=jnp.bfloat16).apply({"params": params}, x, c, train=False)
    assert out.dtype == jnp.float32
    assert float(np.max(np.abs(np.asarray(out) - ref))) < 0.1 * float(np.max(np.abs(ref)))


def test_bad_options_name_the_field():
    net = get_model("ncsnpp", in_channels=3, out_channels=3, progressive="skip")
    with pytest.raises(ValueError, match="progressive"):
        net.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), jnp.ones((1,)), train=False)


# ----------------------------------------------------------------------------- score_sde's Flax code
FLAX_GOLDEN = np.load(FIXTURES / "ncsnpp_flax_golden.npz")
FLAX_CASES = list(make_flax_golden.CASES)


@pytest.mark.parametrize("case", FLAX_CASES)
def test_names_and_output_match_score_sde_flax(case):
    """Same parameter paths and shapes as score_sde's Flax NCSN++ (so its checkpoints load one to one), and the
    same output on the same weights: residual output pyramid, DDPM blocks with FIR / plain conv resampling."""
    opts = json.loads(str(FLAX_GOLDEN[f"{case}/options"]))
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in opts.items()}
    net = get_model("ncsnpp", in_channels=3, out_channels=3, dropout=0.0, **kwargs)
    x, t = FLAX_GOLDEN[f"{case}/x"], FLAX_GOLDEN[f"{case}/t"]
    shapes = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), x, t, train=False))["params"]
    from flax import traverse_util
    mine = sorted((k, tuple(v.shape)) for k, v in traverse_util.flatten_dict(shapes, sep="/").items())
    ref_spec = [(k, tuple(s)) for k, s in json.loads(str(FLAX_GOLDEN[f"{case}/spec"]))]
    assert mine == ref_spec
    weights = make_flax_golden.random_weights(ref_spec, seed=2000 + FLAX_CASES.index(case))
    params = traverse_util.unflatten_dict(weights, sep="/")
    c_noise = np.log(t) if net.embedding_type == "fourier" else t
    out = jax.jit(lambda p, x, c: net.apply({"params": p}, x, c, train=False))(params, x, c_noise)
    ref = FLAX_GOLDEN[f"{case}/out"]
    assert float(np.max(np.abs(ref))) > 0.5
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)
