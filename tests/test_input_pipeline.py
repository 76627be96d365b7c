"""grain pipelines: determinism, checkpointable iterator state, eval padding."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from boneage_jax import data, input_pipeline, ops


def _splits(config):
    return data.select_splits(config.data, data.prepare(config.data), seed=0)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_train_batches_are_deterministic_and_resumable(tiny_config):
    splits = _splits(tiny_config)
    make = lambda seed: iter(input_pipeline.train_dataset(tiny_config.data, splits["train"], 8, seed))  # noqa: E731
    a, b = _take(make(1), 3), _take(make(1), 3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["id"], y["id"])
    other = _take(make(2), 1)[0]
    assert not np.array_equal(other["id"], a[0]["id"])

    first = a[0]
    assert first["image"].shape == (8, 32, 32, 1) and first["image"].dtype == np.uint8  # normalised on the device
    assert first["levels"].shape == (8, 256, 1) and first["levels"].dtype == np.float32
    assert set(first) == {"image", "levels", "male", "boneage", "id", "weight"}
    assert np.all(first["weight"] == 1)

    iterator = make(1)
    next(iterator)
    state = iterator.get_state()
    expected = next(iterator)
    resumed = make(1)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["image"], expected["image"])


def test_train_epochs_cover_every_example_and_reshuffle(tiny_config):
    splits = _splits(tiny_config)
    iterator = iter(input_pipeline.train_dataset(tiny_config.data, splits["train"], 8, 0))
    epoch1 = np.concatenate([next(iterator)["id"] for _ in range(6)])
    epoch2 = np.concatenate([next(iterator)["id"] for _ in range(6)])
    assert sorted(epoch1) == sorted(splits["train"].ids) == sorted(epoch2)
    assert not np.array_equal(epoch1, epoch2)


@pytest.mark.parametrize("normalize", ["zscore", "percentile_zscore", "preprocess_input(mode='tf')|grey_to_rgb",
                                       "preprocess_input(mode='caffe')", "value_range|grey_to_rgb", ""])
def test_normalising_on_the_device_gives_the_hosts_values(tiny_config, normalize):
    """A batch of uint8 images and their grey-level tables, looked up on the device, equals the
    batch the host normalises, bit for bit, for every kind of normalize op."""
    tiny_config.data.normalize = normalize
    tiny_config.data.augment = "flip|affine(rotation=10, shift=0.05)|gamma_jitter(low=0.8, high=1.2)"
    splits = _splits(tiny_config)
    device = next(iter(input_pipeline.train_dataset(tiny_config.data, splits["train"], 8, 0)))
    tiny_config.data.normalize_on_device = False
    host = next(iter(input_pipeline.train_dataset(tiny_config.data, splits["train"], 8, 0)))
    assert "levels" in device and "levels" not in host and device["image"].dtype == np.uint8
    images = np.asarray(input_pipeline.network_images(device))
    assert images.dtype == host["image"].dtype == np.float32
    np.testing.assert_array_equal(images, host["image"])
    np.testing.assert_array_equal(np.asarray(input_pipeline.network_images(host)), host["image"])


def test_normalize_ops_without_a_table_form_stay_on_the_host(tiny_config, monkeypatch):
    tiny_config.data.normalize = "zscore|zscore"  # a statistic of a float image: no grey-level table
    splits = _splits(tiny_config)
    assert not input_pipeline.normalizes_on_device(tiny_config.data)
    batch = next(iter(input_pipeline.train_dataset(tiny_config.data, splits["train"], 8, 0)))
    assert "levels" not in batch and batch["image"].dtype == np.float32
    monkeypatch.setattr(ops, "OPS", dict(ops.OPS))

    @ops.register_augment("to_float")
    def to_float(image, rng):
        return image.astype(np.float32)

    tiny_config.data.normalize, tiny_config.data.augment = "zscore", "to_float"
    with pytest.raises(ValueError, match="normalize_on_device needs a uint8 grey image after data.augment"):
        next(iter(input_pipeline.train_dataset(tiny_config.data, splits["train"], 8, 0)))


@pytest.mark.parametrize("augment", ["flip|affine(rotation=15, shift=0.1, zoom=0.1)", "nguyen",
                                     "affine(rotation=30, shear=10, fill_mode='reflect', fill_value=9)|flip(p=1.0)",
                                     "affine(rotation=20, zoom=0.3, fill_value=200)"])
def test_augmenting_on_the_device_gives_the_hosts_batches(tiny_config, augment):
    """data.augment_on_device: the same draws, warped on the device: the host's images to one
    grey level (OpenCV's fixed-point interpolation weights) at a few pixels."""
    tiny_config.data.image_size, tiny_config.data.augment = 64, augment
    tiny_config.data.normalize = "value_range"
    splits = _splits(tiny_config)
    host = next(iter(input_pipeline.train_dataset(tiny_config.data, splits["train"], 8, 0)))
    tiny_config.data.augment_on_device = True
    device = next(iter(input_pipeline.train_dataset(tiny_config.data, splits["train"], 8, 0)))
    assert set(device) == set(host) | {"warp", "warp_fill"}
    assert device["warp"].shape == (8, 2, 3) and device["warp_fill"].shape == (8, 2)
    expected, got = (np.asarray(input_pipeline.network_images(b)) for b in (host, device))
    difference = np.abs(got - expected)
    assert difference.max() <= 1 / 255 + 1e-6 and (difference > 0).mean() < 0.005
    assert not np.array_equal(np.asarray(input_pipeline.network_images({**device, "warp": device["warp"][::-1]})),
                              expected)  # each image its own warp


def test_warp_grey_is_cv2_warp_affine_to_one_grey_level():
    import cv2
    import jax

    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (120, 90), dtype=np.uint8), (5, 5), 2)
    warp = jax.jit(input_pipeline.warp_grey)
    for mode, border in (("constant", cv2.BORDER_CONSTANT), ("nearest", cv2.BORDER_REPLICATE),
                         ("reflect", cv2.BORDER_REFLECT_101)):
        matrix = ops.affine_matrix((45, 60), rng.uniform(-30, 30), rng.uniform(0.7, 1.3), rng.uniform(-10, 10),
                                   (rng.uniform(-20, 20), rng.uniform(-20, 20)))
        expected = cv2.warpAffine(image, matrix, (90, 120), flags=cv2.INTER_LINEAR, borderMode=border, borderValue=7)
        fill = np.float32([input_pipeline.WARP_FILL_MODES.index(mode), 7])
        got = np.asarray(warp(image, cv2.invertAffineTransform(matrix).astype(np.float32), fill))
        difference = np.abs(got.astype(int) - expected)
        assert got.dtype == np.uint8 and difference.max() <= 1 and (difference > 0).mean() < 0.01, mode


@pytest.mark.parametrize("change, message", [
    ({"augment": "flip|gamma_jitter"}, "gamma_jitter cannot run on the device"),
    ({"augment": "affine(rotation=5)|affine(zoom=0.1)"}, "more than one op fills the border"),
    ({"normalize": "zscore"}, "zscore takes statistics of each image"),
    ({"normalize": "zscore|zscore", "augment": "flip"}, "needs the normalisation on the device too"),
    ({"mask_in_batch": True, "normalize": "value_range"}, "does not move masks"),
])
def test_augmenting_on_the_device_says_what_stands_in_its_way(tiny_config, change, message):
    tiny_config.data.augment, tiny_config.data.augment_on_device = "flip|affine(rotation=10)", True
    for key, value in change.items():
        tiny_config.data[key] = value
    with pytest.raises(ValueError, match=message):
        input_pipeline.train_dataset(tiny_config.data, _splits(tiny_config)["train"], 8, 0)


def test_eval_batches_pad_with_zero_weight(tiny_config):
    splits = _splits(tiny_config)
    batches = list(input_pipeline.eval_batches(tiny_config.data, splits["validation"], 6))
    assert len(batches) == 3 and all(len(b["id"]) == 6 for b in batches)
    weights = np.concatenate([b["weight"] for b in batches])
    assert weights.sum() == 16 and np.all(weights[16:] == 0)
    ids = np.concatenate([b["id"] for b in batches])[:16]
    np.testing.assert_array_equal(ids, splits["validation"].ids)


def test_pipeline_output_is_normalised(tiny_config):
    splits = _splits(tiny_config)
    batch = next(input_pipeline.eval_batches(tiny_config.data, splits["validation"], 4))
    per_image = batch["image"].reshape(4, -1)
    np.testing.assert_allclose(per_image.mean(axis=1), 0, atol=1e-4)
    np.testing.assert_allclose(per_image.std(axis=1), 1, atol=1e-3)


def test_masks_move_with_the_augmentation(tiny_config):
    """Segmentation batches: the mask is flipped and warped with its image."""
    tiny_config.data.mask_in_batch = True
    tiny_config.data.preprocess = "resize_pad"
    tiny_config.data.normalize = "value_range"
    tiny_config.data.augment = "flip(p=1.0)|affine(rotation=15, shift=0.1)"
    splits = _splits(tiny_config)
    batch = next(iter(input_pipeline.train_dataset(tiny_config.data, splits["train"], 8, 0)))
    assert batch["mask"].shape == (8, 32, 32, 1) and set(np.unique(batch["mask"])) <= {0.0, 1.0}
    # The hand is brighter than the background under the (moved) mask, in every image.
    for image, mask in zip(np.asarray(input_pipeline.network_images(batch)), batch["mask"]):
        inside, outside = image[mask > 0], image[mask == 0]
        assert inside.mean() > outside.mean() + 0.1
    tiny_config.data.augment = ""
    plain = next(iter(input_pipeline.train_dataset(tiny_config.data, splits["train"], 8, 0)))
    assert not np.array_equal(plain["mask"], batch["mask"])


def test_balanced_sampling_is_reproducible_and_resumable(tiny_config):
    tiny_config.data.sampling = "balanced"
    tiny_config.data.balance_bins = 3
    tiny_config.data.balance_per_bin = 8
    splits = _splits(tiny_config)
    make = lambda: iter(input_pipeline.train_dataset(tiny_config.data, splits["train"], 8, 0))  # noqa: E731
    ids = np.concatenate([b["id"] for b in _take(make(), 6)])  # two epochs of 24
    again = np.concatenate([b["id"] for b in _take(make(), 6)])
    np.testing.assert_array_equal(ids, again)
    assert not np.array_equal(np.sort(ids[:24]), np.sort(ids[24:]))  # each epoch is a fresh draw
    male = dict(zip(splits["train"].ids, splits["train"].male))
    assert sum(male[i] for i in ids[:24]) == 12  # sexes equal within the epoch
    iterator = make()
    next(iterator)
    state = iterator.get_state()
    expected = next(iterator)["id"]
    resumed = make()
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["id"], expected)
    tiny_config.data.sampling = "stratified"
    with np.testing.assert_raises_regex(ValueError, "data.sampling is 'stratified'"):
        input_pipeline.train_dataset(tiny_config.data, splits["train"], 8, 0)


def test_a_new_op_that_reads_the_mask_gets_it_decoded(tiny_config, monkeypatch):
    """The pipeline asks the registry: an op declaring ``reads=("mask",)`` is handed the record's mask."""
    monkeypatch.setattr(ops, "OPS", dict(ops.OPS))  # the op registered here is dropped afterwards

    @ops.register_preprocess("mask_as_image", on="sample", geometric=False, reads=("mask",))
    def mask_as_image(sample: dict) -> dict:
        if sample.get("mask") is None:
            raise ValueError(f"sample {sample['id']} came without its mask")
        return {**sample, "image": sample["mask"]}

    tiny_config.data.preprocess = "mask_as_image|resize_pad"
    tiny_config.data.normalize = "value_range"
    assert input_pipeline.needs_annotations(tiny_config.data) == (True, False)
    batch = next(input_pipeline.eval_batches(tiny_config.data, _splits(tiny_config)["validation"], 4))
    assert batch["image"].max() == 1.0 and 0.05 < batch["image"].mean() < 0.95
    tiny_config.data.preprocess = "resize_pad|clahe"
    assert input_pipeline.needs_annotations(tiny_config.data) == (False, False)


def test_ops_are_parsed_once_not_per_example(tiny_config, monkeypatch):
    splits = _splits(tiny_config)
    tiny_config.data.augment = "nguyen"
    dataset = input_pipeline.train_dataset(tiny_config.data, splits["train"], 8, 0)
    monkeypatch.setattr(ops, "parse_spec", lambda *args: pytest.fail(f"spec parsed again: {args}"))
    assert next(iter(dataset))["image"].shape == (8, 32, 32, 1)


def test_input_channels_and_prepare_image_match_the_batches(tiny_config):
    splits = _splits(tiny_config)
    for normalize, channels in (("zscore", 1), ("grey_to_rgb|preprocess_input(mode='torch')", 3)):
        tiny_config.data.normalize = normalize
        batch = next(input_pipeline.eval_batches(tiny_config.data, splits["validation"], 4))
        assert input_pipeline.input_channels(tiny_config.data) == channels == batch["image"].shape[-1]
        source = data.data_source(tiny_config.data, splits["validation"].tfds_split)
        record = source[int(splits["validation"].indices[0])]
        image = input_pipeline.prepare_image(tiny_config.data, record["image"])
        np.testing.assert_allclose(image, batch["image"][0], atol=1e-6)


def test_read_threads_default_to_the_cpus_this_process_may_use(monkeypatch):
    from configs.common import base_config

    data_config = base_config().data
    assert data_config.num_threads == 0
    cpus = len(os.sched_getaffinity(0))
    monkeypatch.delenv("BONEAGE_LOCAL_PROCESSES", raising=False)
    monkeypatch.delenv("OMPI_COMM_WORLD_LOCAL_SIZE", raising=False)
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE", raising=False)
    expected = cpus
    assert input_pipeline.read_threads(data_config) == expected
    if cpus == (os.cpu_count() or cpus):  # not bound to a share: the local processes divide the CPUs
        monkeypatch.setenv("BONEAGE_LOCAL_PROCESSES", str(cpus * 2))
        assert input_pipeline.read_threads(data_config) == 1
    data_config.num_threads = 3
    assert input_pipeline.read_threads(data_config) == 3


def test_preprocessed_examples_give_the_same_batches_and_are_computed_once(tiny_config, monkeypatch, capsys):
    """data.cache_preprocessed: the same training and evaluation batches bit for bit, over
    more than one epoch (augmentation must not write into the cached images), and resumable;
    the deterministic ops run once per image, however many epochs and evaluations follow."""
    tiny_config.data.augment = "flip|affine(rotation=15, shift=0.1)|brightness_jitter"
    splits = _splits(tiny_config)
    plain = _take(iter(input_pipeline.train_dataset(tiny_config.data, splits["train"], 8, 3)), 13)  # > 2 epochs
    plain_eval = list(input_pipeline.eval_batches(tiny_config.data, splits["validation"], 6))

    tiny_config.data.cache_preprocessed = True
    monkeypatch.setattr(input_pipeline, "_PREPROCESSED", {})
    calls = []
    real_example_fn = input_pipeline.example_fn

    def counting_example_fn(data_config):
        make = real_example_fn(data_config)
        return lambda record: (calls.append(int(record["id"])), make(record))[1]

    monkeypatch.setattr(input_pipeline, "example_fn", counting_example_fn)
    iterator = iter(input_pipeline.train_dataset(tiny_config.data, splits["train"], 8, 3))
    cached = _take(iterator, 13)
    for _ in range(2):
        cached_eval = list(input_pipeline.eval_batches(tiny_config.data, splits["validation"], 6))
    for x, y in zip(plain + plain_eval, cached + cached_eval):
        assert set(x) == set(y)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert sorted(calls) == sorted(list(splits["train"].ids) + list(splits["validation"].ids))
    assert "Preprocessed 48 train images once" in capsys.readouterr().out

    state = iterator.get_state()
    expected = next(iterator)
    resumed = iter(input_pipeline.train_dataset(tiny_config.data, splits["train"], 8, 3))
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["image"], expected["image"])
    assert len(calls) == len(splits["train"].ids) + len(splits["validation"].ids)  # still cached


def test_the_training_split_is_cached_when_the_run_reads_it_and_it_fits(tiny_config, monkeypatch, capsys):
    """data.cache_preprocessed None: cache when the run reads >= one epoch and the images fit."""
    splits = _splits(tiny_config)
    train = splits["train"]  # 48 images of 32 x 32 (1 KiB each)
    assert tiny_config.data.cache_preprocessed is None
    decide = lambda steps: input_pipeline.caches_training_split(tiny_config.data, train, steps, 8)  # noqa: E731
    assert not decide(None) and not decide(5)  # unknown length; 40 of 48 images: less than one epoch
    assert decide(6)
    monkeypatch.setattr(input_pipeline, "available_memory_bytes", lambda: 4 * 48 * 1024 - 1)
    assert not decide(6)
    assert "Not caching the preprocessed train split: 48 images take 0 MiB" in capsys.readouterr().out
    monkeypatch.setenv("BONEAGE_LOCAL_PROCESSES", "2")  # each process keeps its own: half the budget each
    monkeypatch.setattr(input_pipeline, "available_memory_bytes", lambda: 4 * 48 * 1024)
    assert not decide(6)
    monkeypatch.delenv("BONEAGE_LOCAL_PROCESSES")
    assert decide(6)
    for setting in (True, False):
        tiny_config.data.cache_preprocessed = setting
        assert decide(None) is setting and decide(100) is setting
    tiny_config.data.cache_preprocessed = None
    monkeypatch.setattr(input_pipeline, "_PREPROCESSED", {})
    next(iter(input_pipeline.train_dataset(tiny_config.data, train, 8, 0, num_steps=6)))
    assert "Preprocessed 48 train images once" in capsys.readouterr().out


# grain's worker processes must start under absl.app.run, so this runs as its own program.
_WORKERS_PROGRAM = """
import sys
import numpy as np
from absl import app
from boneage_jax import data, input_pipeline
from configs import demo


def main(argv):
    config = demo.get_config("tiny")
    config.data.manual_dir, config.data.data_dir = argv[1], argv[2]
    config.data.augment = "flip|affine(rotation=15, shift=0.1)|brightness_jitter"
    splits = data.select_splits(config.data, data.prepare(config.data), seed=0)
    for cache in (None, False):  # 12 steps of 8 read the 48 images twice: cached by default
        config.data.cache_preprocessed = cache

        def make(workers):
            config.data.num_workers = workers
            return iter(input_pipeline.train_dataset(config.data, splits["train"], 8, 3, num_steps=12))

        threads = make(0)
        expected = [next(threads) for _ in range(8)]
        workers = make(2)
        got = [next(workers) for _ in range(5)]
        state = workers.get_state()
        got += [next(workers) for _ in range(3)]
        if cache is None:  # the default path resumes too (each pool of workers costs seconds)
            resumed = make(2)
            resumed.set_state(state)
            got += [next(resumed) for _ in range(3)]
            expected += expected[5:]
        for x, y in zip(expected, got, strict=True):
            assert set(x) == set(y), (set(x), set(y))
            for key in x:
                np.testing.assert_array_equal(x[key], y[key])
        print(f"cache {cache}: the same batches from 2 worker processes")


app.run(main)
"""


def test_worker_processes_give_the_threads_batches_and_resume(tiny_config):
    """data.num_workers > 0 (grain multiprocessing): the batches of the threaded pipeline, bit
    for bit, with and without the cache, and (cached, the default) an iterator state that
    resumes mid-stream."""
    _splits(tiny_config)  # the store, prepared here
    done = subprocess.run([sys.executable, "-c", _WORKERS_PROGRAM, tiny_config.data.manual_dir,
                           tiny_config.data.data_dir], cwd=os.path.dirname(os.path.dirname(__file__)),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("the same batches from 2 worker processes") == 2, done.stdout
