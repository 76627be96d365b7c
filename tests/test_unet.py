"""U-Net for hand masks: it learns to segment synthetic ellipses, at any input size.

The fit test trains the paper's 4-level U-Net at 8 base filters (``base_filters=8``, the CPU
setting) on 48x48 noisy images of random filled ellipses for 100 Adam steps (batch 4, learning
rate 4e-3) and requires IoU > 0.9 on held-out images (measured: 0.939 in 7.3 s; at 64x64 0.962
in 10.5 s; 80 steps at 48x48 0.89; at 64x64, 200 steps at 2e-3 gave 0.961, 60 steps at 5e-3 0.77). Weights start from numpy He-normal draws (the model's own
initialiser, without compiling JAX's random initialisers once per parameter shape).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from helpers import fast_init

from boneage_jax import models
from boneage_jax.models import unet


def ellipses(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy images (n, size, size, 1) of one random filled ellipse each and its 0/1 mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images = np.empty((n, size, size, 1), np.float32)
    masks = np.empty((n, size, size, 1), np.float32)
    for i in range(n):
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        ry, rx = rng.uniform(0.12, 0.3, 2) * size
        angle = rng.uniform(0, np.pi)
        c, s = np.cos(angle), np.sin(angle)
        u = ((xx - cx) * c + (yy - cy) * s) / rx
        v = (-(xx - cx) * s + (yy - cy) * c) / ry
        mask = (u**2 + v**2 <= 1).astype(np.float32)
        brightness = rng.uniform(0.5, 1.0)
        images[i, ..., 0] = mask * brightness + rng.normal(0, 0.15, (size, size)) + rng.uniform(-0.2, 0.2)
        masks[i, ..., 0] = mask
    return images, masks


def iou(logits: np.ndarray, masks: np.ndarray) -> float:
    pred = logits > 0
    truth = masks > 0.5
    return float((pred & truth).sum() / max((pred | truth).sum(), 1))


def test_unet_fits_synthetic_ellipses():
    size, batch, steps = 48, 4, 100
    model = fast_init(
        lambda: models.SEGMENTATION_NETWORKS.create(
            "unet", in_channels=1, image_size=size, rngs=models.Rngs(0), base_filters=8
        )
    )
    assert model.depth == 4 and model.num_features == 8
    train_x, train_y = ellipses(256, size, seed=0)
    test_x, test_y = ellipses(32, size, seed=1)

    tx = optax.adam(4e-3)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = jax.jit(tx.init)(params)  # (eagerly: one compiled zeros per parameter shape)

    @jax.jit
    def step(params, rest, opt_state, x, y):
        model = nnx.merge(graphdef, params, rest)
        model.train()

        def loss_fn(model):
            return optax.sigmoid_binary_cross_entropy(model.segment(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), nnx.split(model, nnx.Param, ...)[2], opt_state, loss

    @jax.jit
    def predict(params, rest, x):
        model = nnx.merge(graphdef, params, rest)
        model.eval()
        return model.segment(x)

    assert iou(np.asarray(predict(params, rest, test_x)), test_y) < 0.9
    order = np.random.default_rng(2).permutation(np.arange(steps * batch) % len(train_x))
    for i in range(steps):
        idx = order[i * batch : (i + 1) * batch]
        params, rest, opt_state, loss = step(params, rest, opt_state, train_x[idx], train_y[idx])
    assert np.isfinite(float(loss))
    assert iou(np.asarray(predict(params, rest, test_x)), test_y) > 0.9


def test_unet_segment_shapes_classes_and_dropout():
    model = fast_init(lambda: unet.UNet(in_channels=3, rngs=models.Rngs(0), depth=2, base_filters=4, num_classes=3))
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 13, 18, 3)), jnp.float32)  # not multiples of 4

    @nnx.jit
    def run(model, x):
        return model.segment(x), model.decode(x), model(x)

    model.eval()
    logits, decoded, pooled = run(model, x)
    assert logits.shape == (2, 13, 18, 3) and logits.dtype == jnp.float32
    assert decoded.shape == (2, 13, 18, 4) and pooled.shape == (2, 4)
    np.testing.assert_allclose(np.asarray(pooled), np.asarray(decoded).mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    again = run(model, x)[0]
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(again))  # eval: no dropout
    model.train()
    a, b = run(model, x)[0], run(model, x)[0]
    assert not np.allclose(np.asarray(a), np.asarray(b))  # train: bottleneck dropout 0.5 differs per call


def test_unet_rejects_bad_config():
    with pytest.raises(ValueError, match="depth"):
        unet.UNet(in_channels=1, rngs=models.Rngs(0), depth=0)
