"""Helpers shared by the tests: fast deterministic initialisation, a forward pass and a gradient step
for the model tests, a Keras model's output, DICOM files for the image readers."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from boneage_jax import state


# The model tests' programs (an initialiser, one forward, one gradient) run once: compiled with the
# options the library uses for its own one-off programs (LLVM level 0 on the CPU, about twice as
# fast to compile as the suite's level 1).
FAST_COMPILE = state.one_off_options()


def _is_kernel(path, variable) -> bool:
    del path
    return isinstance(variable, nnx.Param) and variable.get_value().ndim >= 2


def fast_init(build, seed: int = 0):
    """``build()`` with its kernels drawn on the host: a test-only shortcut for large networks.

    Every ``nnx.Param`` of rank >= 2 (a kernel) is filled by its shape alone with numpy,
    N(0, 2 / fan_in) with fan_in the product of all but the last axis; everything else (biases,
    BatchNorm scales and statistics, non-trainable variables, RNG state) keeps the value of the
    network's own initialisers, computed in one compiled call from which XLA drops the kernels
    (the network is traced once: its structure and kernel shapes are read during that trace).
    Eagerly, ``jax.random`` compiles one kernel per parameter shape (~0.3-0.7 s each on XLA:CPU),
    and compiling them all in one call takes longer still.
    """
    traced = {}

    def init():
        graphdef, kernels, rest = nnx.split(build(), _is_kernel, ...)
        # The structure, read during this one trace: kernels become Variables again outside it.
        leaves, treedef = jax.tree.flatten(kernels)
        traced.update(graphdef=graphdef, treedef=treedef, shapes=[(x.shape, x.dtype) for x in leaves])
        return rest

    rest = jax.jit(init, compiler_options=FAST_COMPILE)()
    rng = np.random.default_rng(seed)
    values = []
    for shape, dtype in traced["shapes"]:
        drawn = rng.standard_normal(shape) * np.sqrt(2.0 / max(1, math.prod(shape[:-1])))
        # Cast on the host and device_put: jnp.asarray would compile an identity per shape (jax 0.10).
        values.append(jax.device_put(drawn.astype(dtype)))
    return nnx.merge(traced["graphdef"], jax.tree.unflatten(traced["treedef"], values), rest)


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _grad_step(graphdef, state, x):
    model = nnx.merge(graphdef, state)

    def loss(m):
        y = m(x)
        return y.astype(jnp.float32).mean(), y

    return nnx.value_and_grad(loss, has_aux=True)(model), nnx.state(model)


def grad_step(model, x):
    """Mean of the backbone's float32 features and its gradient: ``((loss, features), grads)``;
    the model's state (BatchNorm statistics, RNG counts) is updated as by ``nnx.jit``."""
    graphdef, state = nnx.split(model)
    result, state = _grad_step(graphdef, state, x)
    nnx.update(model, state)
    return result


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _forward(graphdef, state, *inputs):
    return nnx.merge(graphdef, state)(*inputs)


def forward(model, *inputs):
    """``model(*inputs)`` compiled for a single call (the model's mode as it is; its state unchanged)."""
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, *inputs)


def keras_forward(model, x: np.ndarray) -> np.ndarray:
    """A Keras model's (JAX backend) inference-mode output, as ``model.predict`` gives it, compiled
    as a one-off program: ``predict`` compiles at the suite's optimisation level (5.3 s instead of
    2.1 s for EfficientNet-B3)."""
    call = jax.jit(lambda trainable, fixed, x: model.stateless_call(trainable, fixed, x, training=False)[0],
                   compiler_options=FAST_COMPILE)
    return np.asarray(call([v.value for v in model.trainable_variables],
                           [v.value for v in model.non_trainable_variables], x))


def write_dicom(path: str, pixels: np.ndarray, photometric: str = "MONOCHROME2", center=None, width=None,
                slope=None, intercept=None) -> None:
    """A 16-bit single-frame DICOM file (uncompressed, explicit VR little endian)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if center is not None:
        ds.WindowCenter, ds.WindowWidth = center, width
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
