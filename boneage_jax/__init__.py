"""boneage_jax: bone age assessment from hand radiographs in JAX/Flax."""

__version__ = "0.1.0"
