"""Compiled CPU kernels: oneDNN convolutions as XLA FFI custom calls (``onednn``), built by
``python -m boneage_jax.kernels.build``."""
