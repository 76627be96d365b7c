"""Peer-benchmark job for Keras 3 on TensorFlow: the same training step through ``train_on_batch``.

    python benchmarks/peers/job_keras.py --network=resnet50 [--image_size=256] [--batch_size=8] \
        [--warmup_steps=2] [--steps=10] [--device=cpu] [--jit_compile=auto] [--serve]

``keras.applications`` ``ResNet50``, ``Xception``, ``InceptionV3``, ``EfficientNetB0`` or ``VGG19``
with ``include_top=False, pooling="avg", weights=None``, then ``Dense(1)`` (float32 output),
compiled with ``keras.optimizers.AdamW(learning_rate=1e-3, weight_decay=1e-4)`` and ``"mse"``,
and timed through ``model.train_on_batch`` on tensors already in memory (BatchNorm in training
mode, as ``train_on_batch`` runs it). ``--jit_compile=auto`` is Keras's default: on the
TensorFlow backend it resolves to XLA off when TensorFlow sees no accelerator (a ``tf.function``
graph with TensorFlow's oneDNN kernels) and to XLA on a GPU; the row says which it resolved to.
Xception needs at least 71 px and InceptionV3 75 px.

``--precision=bfloat16`` (the default on a GPU, ``--device=gpu``): the ``mixed_bfloat16`` policy
(the output layer stays float32). The GPU path has not been run yet.
"""

from __future__ import annotations

import math
import os
import sys

import job_common

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

APPLICATIONS = {
    "resnet50": "ResNet50",
    "xception": "Xception",
    "inception_v3": "InceptionV3",
    "efficientnet_b0": "EfficientNetB0",
    "vgg19": "VGG19",
}
JIT_COMPILE = {"auto": "auto", "true": True, "false": False}


def add_flags(parser) -> None:
    parser.add_argument("--jit_compile", choices=sorted(JIT_COMPILE), default="auto",
                        help="Keras's model.compile(jit_compile=...); auto is Keras's default")


def versions() -> dict:
    import keras  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    return {"tensorflow": tf.__version__, "keras": keras.__version__, "backend": keras.backend.backend(),
            "python": job_common.python_version(),
            "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "(unset: TensorFlow's default)"),
            "gpus": len(tf.config.list_physical_devices("GPU"))}


def main() -> int:
    args = job_common.parse_arguments(__doc__.splitlines()[0], add_flags)
    if args.versions:
        job_common.emit({"versions": versions()})
        return 0
    import keras  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(f"KERAS_BACKEND is {keras.backend.backend()!r}; this job times Keras on TensorFlow")
    if args.device == "gpu":
        if not tf.config.list_physical_devices("GPU"):
            raise RuntimeError("--device=gpu, but TensorFlow sees no GPU (tensorflow-cpu has none: install tensorflow)")
    else:
        tf.config.set_visible_devices([], "GPU")
    if args.precision == "bfloat16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    keras.utils.set_random_seed(0)
    application = getattr(keras.applications, APPLICATIONS[args.network])
    backbone = application(include_top=False, weights=None, pooling="avg",
                           input_shape=(args.image_size, args.image_size, 3))
    outputs = keras.layers.Dense(1, dtype="float32")(backbone.output)
    model = keras.Model(backbone.input, outputs)
    model.compile(optimizer=keras.optimizers.AdamW(learning_rate=job_common.LEARNING_RATE,
                                                   weight_decay=job_common.WEIGHT_DECAY),
                  loss="mse", jit_compile=JIT_COMPILE[args.jit_compile])
    images = tf.random.normal((args.batch_size, args.image_size, args.image_size, 3), seed=0)
    targets = tf.random.normal((args.batch_size, 1), seed=1)

    def step() -> float:
        return float(model.train_on_batch(images, targets, return_dict=True)["loss"])

    timing = job_common.run_steps(step, args)
    trainable = int(sum(math.prod(weight.shape) for weight in model.trainable_weights))  # as the other stacks count
    xla = "XLA" if model.jit_compile else "tf.function without XLA"
    precision = "mixed_bfloat16" if args.precision == "bfloat16" else "float32"
    job_common.emit(job_common.result(
        args, "keras", timing, parameters=trainable, jit_compile=bool(model.jit_compile),
        built=(f"keras.applications.{APPLICATIONS[args.network]}(include_top=False, pooling='avg') + Dense(1), "
               f"train_on_batch, jit_compile={args.jit_compile} -> {xla}, {precision}"),
        versions=versions()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
