"""Sex fusion and prediction heads on top of pooled backbone features.

Fusion modes:

- ``none``: sex-agnostic, the head sees image features only;
- ``concat``: sex (1 male, 0 female) as a parallel input concatenated to the features;
- ``winner16bit``: the 2017 RSNA winner (16 Bit): sex through Dense(32), concatenated with the
  features, then Dense(1000), Dense(1000) (ReLU) before the output.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

FUSIONS = ("none", "concat", "winner16bit")
WINNER_SEX_UNITS = 32
WINNER_HIDDEN = (1000, 1000)


class FusionHead(nnx.Module):
    """Features (B, F) and sex (B,) -> outputs (B, num_outputs)."""

    def __init__(
        self,
        num_features: int,
        *,
        fusion: str,
        hidden: tuple[int, ...] = (),
        dropout: float = 0.0,
        num_outputs: int = 1,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if fusion not in FUSIONS:
            raise ValueError(f"config.model.sex_fusion {fusion!r}; expected one of {FUSIONS}")
        self.fusion = fusion
        width = num_features
        winner = fusion == "winner16bit"
        self.sex_dense = nnx.Linear(1, WINNER_SEX_UNITS, dtype=dtype, rngs=rngs) if winner else None
        if winner:
            width += WINNER_SEX_UNITS
            hidden = WINNER_HIDDEN + tuple(hidden)
        elif fusion == "concat":
            width += 1
        layers = []
        for units in hidden:
            layers.append(nnx.Linear(width, units, dtype=dtype, rngs=rngs))
            width = units
        self.hidden = nnx.List(layers)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.out = nnx.Linear(width, num_outputs, dtype=dtype, rngs=rngs)

    def __call__(self, features: jnp.ndarray, male: jnp.ndarray) -> jnp.ndarray:
        male = male.astype(features.dtype)[:, None]
        if self.fusion == "winner16bit":
            features = jnp.concatenate([features, nnx.relu(self.sex_dense(male))], axis=-1)
        elif self.fusion == "concat":
            features = jnp.concatenate([features, male], axis=-1)
        for layer in self.hidden:
            features = self.dropout(nnx.relu(layer(features)))
        return self.out(self.dropout(features)).astype(jnp.float32)
