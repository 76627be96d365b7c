"""``python -m boneage_jax.weights``: converts a Keras/torch weight file into a pretrained directory."""

import sys

from boneage_jax.weights import main

sys.exit(main())
