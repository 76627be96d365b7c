"""boneage_jax: bone age assessment from hand radiographs in JAX/Flax."""

from boneage_jax import allocator as _allocator

__version__ = "0.1.0"

_allocator.apply()  # before JAX starts its backend: see boneage_jax/allocator.py
