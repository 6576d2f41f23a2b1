"""mae_jax: masked image modeling in JAX/Flax."""

__version__ = "0.1.0"
