"""Command-line tools that look at data and runs (``python -m boneage_jax.tools.show``)."""
