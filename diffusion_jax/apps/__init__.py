"""Programs behind ``python -m diffusion_jax <command>``: each module has ``main(argv)``.

The library never imports from here; apps import the library.
"""
