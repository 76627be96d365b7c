"""``python -m boneage_jax.weights``: converts a Keras/torch weight file, or a run's backbone, into a pretrained directory."""

from boneage_jax import cli
from boneage_jax.weights import main

cli.run(main)
