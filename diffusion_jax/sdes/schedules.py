"""Noise-rate schedules beta(t) and their integrals B(t) = int_0^t beta(s) ds.

Every linear family runs on the time change B: the SDE du = beta A u dt + sqrt(beta) L dW is the
time-homogeneous SDE du = A u dB + L dW_B, so transition and covariance depend on t only through B(t).
Each schedule is evaluated with an array namespace ``xp`` (``jax.numpy`` by default, ``numpy`` for the
float64 host computations that build tables and references).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

Array = Any


@dataclasses.dataclass(frozen=True)
class ConstantBeta:
    """beta(t) = beta, B(t) = beta t."""

    beta_value: float = 4.0

    def __post_init__(self) -> None:
        if not self.beta_value > 0:
            raise ValueError(f"constant beta must be > 0, got {self.beta_value}")

    def beta(self, t: Array, xp=jnp) -> Array:
        return self.beta_value * xp.ones_like(t)

    def integral(self, t: Array, xp=jnp) -> Array:
        return self.beta_value * t

    def inverse_integral(self, b: Array, xp=jnp) -> Array:
        return b / self.beta_value


@dataclasses.dataclass(frozen=True)
class LinearBeta:
    """beta(t) = beta_min + t (beta_max - beta_min) (score_sde's VP), B(t) = beta_min t + (beta_max-beta_min) t^2 / 2."""

    beta_min: float = 0.1
    beta_max: float = 20.0

    def __post_init__(self) -> None:
        if not (self.beta_min > 0 and self.beta_max >= self.beta_min):
            raise ValueError(
                f"linear beta needs 0 < beta_min <= beta_max, got ({self.beta_min}, {self.beta_max})")

    def beta(self, t: Array, xp=jnp) -> Array:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integral(self, t: Array, xp=jnp) -> Array:
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    def inverse_integral(self, b: Array, xp=jnp) -> Array:
        a = 0.5 * (self.beta_max - self.beta_min)
        if a == 0:
            return b / self.beta_min
        # Root of a t^2 + beta_min t - b = 0 written without cancellation for small b.
        return 2.0 * b / (self.beta_min + xp.sqrt(self.beta_min ** 2 + 4.0 * a * b))


@dataclasses.dataclass(frozen=True)
class GeometricSigma:
    """VE: sigma(t) = s_min (s_max/s_min)^t, beta(t) = d sigma^2/dt, B(t) = sigma(t)^2 - sigma(0)^2.

    B is computed with expm1 so that Var(x_t | x_0) = B(t) keeps full relative precision at small t.
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0

    def __post_init__(self) -> None:
        if not (0 < self.sigma_min < self.sigma_max):
            raise ValueError(
                f"VE needs 0 < sigma_min < sigma_max, got ({self.sigma_min}, {self.sigma_max})")

    @property
    def _log_ratio(self) -> float:
        return math.log(self.sigma_max / self.sigma_min)

    def sigma(self, t: Array, xp=jnp) -> Array:
        return self.sigma_min * xp.exp(t * self._log_ratio)

    def beta(self, t: Array, xp=jnp) -> Array:
        return 2.0 * self._log_ratio * self.sigma(t, xp) ** 2

    def integral(self, t: Array, xp=jnp) -> Array:
        return self.sigma_min ** 2 * xp.expm1(2.0 * self._log_ratio * t)

    def inverse_integral(self, b: Array, xp=jnp) -> Array:
        return xp.log1p(b / self.sigma_min ** 2) / (2.0 * self._log_ratio)


Schedule = ConstantBeta | LinearBeta | GeometricSigma
