"""Where a model looks: Grad-CAM for any convolutional bone-age model, attention maps of
``vgg19_attention``, and :func:`overlay`, which draws a map over the image it explains.

Grad-CAM (Selvaraju et al. 2017) weights the channels of a late convolutional feature map
``A`` (B, h, w, C) by the spatial mean of the gradient of the predicted bone age (months)
with respect to it, sums them and keeps the positive part:
``cam = relu(sum_c mean_hw(d age / d A_c) * A_c)``, normalised to [0, 1] per image. Red
regions are those whose activation raises the predicted age.

Finding ``A`` generically: the model's forward pass (``inference.predict_step``) is traced to a
jaxpr, and ``A`` is the *last* value in program order shaped (B, h, w, C) with h * w > 1 (the
feature map that global pooling or flattening reduces: the last block's activation in ResNet,
Xception, EfficientNet, the Inception and ConvMixer families, CaffeNet's and the small CNNs'
last pooled map, VGG's last pre-pool activation when its final map is 1x1, the attended
features of ``vgg19_attention``). The jaxpr is evaluated again with a zero perturbation
added to that value, and the gradient with respect to the perturbation is the gradient with
respect to ``A``. This needs no feature-map method in the backbone, so it works for every
family; a map computed inside a nested ``jax.jit`` / ``scan`` of a backbone is not visible at
the top level, and the last visible one is used instead.
"""

from __future__ import annotations

import functools

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from boneage_jax import inference


class NoFeatureMapError(ValueError):
    """The forward pass has no spatial feature map to explain."""


# What the primitive that produced the feature map usually is, for captions.
LAYER_NAMES = {
    "custom_jvp_call": "activation",
    "jit": "activation",
    "reduce_window_max": "max pooling",
    "reduce_window_sum": "average pooling",
    "conv_general_dilated": "convolution",
    "add": "sum (bias, BatchNorm or residual)",
    "mul": "product (BatchNorm scale or attention)",
    "concatenate": "concatenation (Inception block)",
}


def _is_feature_map(var, batch: int) -> bool:
    shape = getattr(getattr(var, "aval", None), "shape", ())
    return len(shape) == 4 and shape[0] == batch and shape[1] * shape[2] > 1


def _evaluate(jaxpr, consts, args, target, delta):
    """Evaluates ``jaxpr`` adding ``delta`` to the value of variable ``target``; returns
    (outputs, the unperturbed value of ``target``)."""
    env = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    captured = None
    for eqn in jaxpr.eqns:
        params = eqn.primitive.get_bind_params(eqn.params)
        subfuns, params = params if isinstance(params, tuple) else ((), params)  # older JAX: (subfuns, params)
        outs = eqn.primitive.bind(*subfuns, *map(read, eqn.invars), **params)
        outs = outs if eqn.primitive.multiple_results else [outs]
        for var, value in zip(eqn.outvars, outs):
            if var is target:
                captured = value
                value = value + delta
            env[var] = value
    return [read(v) for v in jaxpr.outvars], captured


def gradcam(run, images: np.ndarray, male: np.ndarray) -> tuple[np.ndarray, dict]:
    """Grad-CAM maps (B, H, W) in [0, 1] at the input resolution, for a loaded bone-age run
    (``inference.LoadedRun``), and a description of the feature map used
    (``{"shape": (h, w, C), "primitive": name, "position": i of n}``)."""
    images = jnp.asarray(images, jnp.float32)
    male = jnp.asarray(male, jnp.float32)
    batch = images.shape[0]
    predict = functools.partial(inference.predict_step, graphdef=run.graphdef, objective=run.objective)

    def age_sum(params, rest, rng_state, images, male):
        return jnp.sum(predict(params, rest, rng_state, {"image": images, "male": male})["boneage"])

    args = (run.params, run.rest, run.rng_state, images, male)
    closed = jax.make_jaxpr(age_sum)(*args)
    jaxpr = closed.jaxpr
    found = [(i, eqn, var) for i, eqn in enumerate(jaxpr.eqns) for var in eqn.outvars if _is_feature_map(var, batch)]
    if not found:
        raise NoFeatureMapError(f"Grad-CAM: no (B, h, w, C) feature map with h * w > 1 in {run.config.model.name}'s forward "
                         "pass (is the input too small?)")
    position, eqn, target = found[-1]
    flat = jax.tree.leaves(args)

    @jax.jit
    def maps(flat):
        def objective(delta):
            (out,), captured = _evaluate(jaxpr, closed.consts, flat, target, delta)
            return out, captured

        grads, captured = jax.grad(objective, has_aux=True)(jnp.zeros(target.aval.shape, target.aval.dtype))
        weights = jnp.mean(grads.astype(jnp.float32), axis=(1, 2), keepdims=True)  # (B, 1, 1, C)
        return jax.nn.relu(jnp.sum(weights * captured.astype(jnp.float32), axis=-1))  # (B, h, w)

    cams = np.asarray(maps(flat))
    size = (images.shape[2], images.shape[1])
    out = np.stack([_normalise(cv2.resize(c, size, interpolation=cv2.INTER_LINEAR)) for c in cams])
    info = {"shape": tuple(int(s) for s in target.aval.shape[1:]), "primitive": eqn.primitive.name,
            "layer": LAYER_NAMES.get(eqn.primitive.name, eqn.primitive.name),
            "position": f"{position + 1} of {len(jaxpr.eqns)}"}
    return out, info


def attention_maps(run, images: np.ndarray) -> np.ndarray | None:
    """``backbone.attention_map`` upsampled to the input, (B, H, W) in [0, 1]; None when the
    backbone has no attention map (only ``vgg19_attention`` has one)."""
    model = run.model()
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(backbone, "attention_map"):
        return None
    model.eval()
    maps = np.asarray(backbone.attention_map(jnp.asarray(images, jnp.float32)), np.float32)
    size = (images.shape[2], images.shape[1])
    return np.stack([cv2.resize(m, size, interpolation=cv2.INTER_LINEAR) for m in maps])


def _normalise(m: np.ndarray) -> np.ndarray:
    hi = float(m.max())
    return (m / hi).astype(np.float32) if hi > 0 else np.zeros_like(m, np.float32)


def overlay(image: np.ndarray, heat: np.ndarray, min_side: int = 256) -> np.ndarray:
    """uint8 grey (S, S) and a map in [0, 1] -> a BGR uint8 overlay (JET colours), upscaled to
    at least ``min_side`` px: the heatmaps of ``predict --heatmaps`` and of ``serve``."""
    grey = image if image.dtype == np.uint8 else np.clip(image, 0, 255).astype(np.uint8)
    base = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    colour = cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
    alpha = (0.6 * heat)[..., None]
    out = np.round(base * (1 - alpha) + colour * alpha).astype(np.uint8)
    side = max(out.shape[:2])
    if side < min_side:
        scale = min_side / side
        out = cv2.resize(out, (round(out.shape[1] * scale), round(out.shape[0] * scale)),
                         interpolation=cv2.INTER_NEAREST)
    return out
