"""Helpers shared by the model tests: fast deterministic initialisation and a gradient step."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from boneage_jax.models import vgg19_attention

_KEY = []


def fast_init(build, seed: int = 0):
    """``build()`` without running its initialisers: kernels N(0, 2/fan_in), biases 0, BN 1/0."""
    if not _KEY:
        _KEY.append(jax.random.key(seed))
    graphdef, state = nnx.split(nnx.eval_shape(build))
    rng = np.random.default_rng(seed)
    for path, var in jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda v: isinstance(v, nnx.Variable)):
        name = getattr(path[-1], "key", str(path[-1]))
        shape, dtype = var.get_value().shape, var.get_value().dtype
        if isinstance(var, nnx.RngKey):
            var.set_value(_KEY[0])
            continue
        if isinstance(var, nnx.Param) and name == "kernel":
            fan_in = max(1, math.prod(shape[:-1]))
            value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        elif isinstance(var, nnx.RngCount) or name in ("bias", "mean"):
            value = np.zeros(shape)
        elif name in ("scale", "var") or isinstance(var, vgg19_attention.FixedWeight):
            value = np.ones(shape)
        else:
            raise AssertionError(f"fast_init: no rule for {type(var).__name__} {jax.tree_util.keystr(path)}")
        var.set_value(jnp.asarray(np.asarray(value, dtype)))  # cast on the host: no per-shape compile
    return nnx.merge(graphdef, state)


@nnx.jit
def grad_step(model, x):
    """Mean of the backbone's float32 features and its gradient: ``((loss, features), grads)``."""

    def loss(m):
        y = m(x)
        return y.astype(jnp.float32).mean(), y

    return nnx.value_and_grad(loss, has_aux=True)(model)
