"""Training: config -> experiment -> sharded jitted step -> loop with orbax checkpoints and clu logs."""
from diffusion_jax.training.loop import load_run, train
from diffusion_jax.training.sampling import compile_sampler, sample_data, save_samples
from diffusion_jax.training.setup import Experiment, build_experiment, make_mesh
from diffusion_jax.training.state import TrainState, create_state, make_optimizer

__all__ = ["train", "load_run", "compile_sampler", "sample_data", "save_samples", "Experiment", "build_experiment", "make_mesh",
           "TrainState", "create_state", "make_optimizer"]
