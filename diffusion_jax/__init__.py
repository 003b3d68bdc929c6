"""diffusion_jax: linear phase-space diffusion models in JAX/Flax."""
__version__ = "0.1.0"
