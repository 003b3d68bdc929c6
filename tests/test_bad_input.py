"""Bad input fails at construction with a message that names the fix."""
import pytest

from diffusion_jax import sdes


def test_unknown_family_lists_known_ones():
    with pytest.raises(ValueError, match="known families: bdm, cdhold, cld, hold, pfgm, pfgmpp, psld, radial_exp, "
                                         "radial_tanh, subvp, told, ve, vp"):
        sdes.make("cldd")


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="cdhold", n=0), "order n must be an integer >= 1"),
    (dict(name="cdhold", n=2.5), "order n must be an integer >= 1"),
    (dict(name="cld", beta=0.0), "beta must be a positive"),
    (dict(name="cld", m_inv=-4.0), "m_inv must be a positive"),
    (dict(name="psld", nu=-1.0), "nu must be a positive"),
    (dict(name="hold", g=(1.0, 2.0), xi=0.0), "xi must be a positive"),
    (dict(name="hold", g=(1.0, 0.0), xi=2.0), "must be non-zero"),
    (dict(name="vp", beta_min=1.0, beta_max=0.5), "beta_min <= beta_max"),
    (dict(name="ve", sigma_min=5.0, sigma_max=1.0), "sigma_min < sigma_max"),
    (dict(name="cld", T=1.0, t_min=2.0), "0 < t_min < T"),
    (dict(name="cld", mass=3.0), "cld accepts"),
])
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sdes.make(**kwargs)


def test_time_outside_range():
    sde = sdes.make("cld")
    with pytest.raises(ValueError, match=r"t must lie in \[0, T=1.0\]"):
        sde.covariance(1.5)
    with pytest.raises(ValueError, match="t must lie"):
        sde.cholesky(-0.1)
    with pytest.raises(ValueError, match="s must lie"):
        sde.transition(t=0.5, s=-1.0)


def test_unstable_drift_rejected_by_core():
    with pytest.raises(ValueError, match="positive semi-definite"):
        sdes.LinearSDE("x", [[-1.0]], [[-1.0]], sdes.ConstantBeta(1.0))
