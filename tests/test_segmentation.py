"""The U-Net hand segmentation (``configs/unet_segmentation.py:tiny``, widened): trained briefly
on phantoms it must reach Jaccard 0.9 on their test split; ``boneage_jax.segment`` writes its
masks for every image, which the ``hand_mask`` op then reads from the cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from conftest import check_run_results

# Its module-scoped trained run is built once: every test of the file on one xdist worker.
pytestmark = pytest.mark.xdist_group("test_segmentation")

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory):
    from configs import unet_segmentation
    from tfds_rsna import phantom

    from boneage_jax import train

    root = tmp_path_factory.mktemp("unet")
    manual = str(root / "phantom")
    phantom.write_dataset(manual, num_train=96, num_validation=16, num_test=32, seed=1, height=160, width=128)
    # The config file's tiny variant (its end-to-end run for tests/test_configs.py), made big
    # enough to learn the phantoms' hands.
    config = unet_segmentation.get_config("tiny")
    config.data.manual_dir = manual
    config.data.data_dir = str(root / "tfds")
    config.data.image_size = 80
    config.data.num_threads = 2
    config.model.kwargs.depth = 3
    config.model.kwargs.base_filters = 8
    config.model.kwargs.dropout = 0.0
    # 80 px, batch 4, 200 steps at 5e-3: test Jaccard 0.915 in 21 s, where batch 8 for 200 steps at
    # 3e-3 took 30 s for 0.916 (batch 4 at 4e-3: 0.906 after 200 steps, 0.914 after 250; 96 px /
    # batch 16: three times the work for 0.91)
    config.batch_size = 4
    config.num_train_steps = 200
    config.learning_rate = 5e-3
    config.warmup_steps = 10
    config.eval_every = config.checkpoint_every = 200
    config.log_every = 50
    workdir = str(root / "run")
    results = train.train_and_evaluate(config, workdir)
    return workdir, manual, results


def test_the_file_runs_on_one_worker(request):
    """Under ``pytest -n N --dist loadgroup`` (make test), xdist renames each test of a group
    ``<id>@<group>`` and gives the group to one worker; without the rename (pytest 9.2 with
    pytest-xdist 3.8) the group is spread and the U-Net run is trained on every worker."""
    if getattr(request.config.option, "loadgroup", False):  # (set in xdist's workers)
        assert request.node.nodeid.endswith("@test_segmentation"), request.node.nodeid


def test_the_config_runs_end_to_end(unet_run):
    """configs/unet_segmentation.py:tiny trains, evaluates and writes results.json (the check
    tests/test_configs.py makes of the other configs)."""
    workdir, _, results = unet_run
    check_run_results(workdir, results, "segmentation")
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["data"]["builder_config"] == "max512"  # (the tiny variant's)


def test_unet_reaches_jaccard_09_on_phantom_test_split(unet_run):
    workdir, _, results = unet_run
    assert results["test"]["num_examples"] == 32
    assert results["test"]["jaccard"] >= 0.9, results["test"]
    assert results["test"]["jaccard_post"] >= results["test"]["jaccard"] - 0.01
    with open(os.path.join(workdir, "jaccard_test.csv")) as f:
        rows = f.read().splitlines()
    assert rows[0] == "id,jaccard,jaccard_post" and len(rows) == 33
    per_image = np.array([float(r.split(",")[1]) for r in rows[1:]])
    assert abs(per_image.mean() - results["test"]["jaccard"]) < 1e-5


def test_segment_writes_a_mask_per_image_for_the_mask_op(unet_run, tmp_path):
    workdir, manual, _ = unet_run
    out = str(tmp_path / "masks")
    result = subprocess.run([sys.executable, "-m", "boneage_jax.segment", f"--workdir={workdir}", f"--out={out}"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Wrote 144 masks" in result.stdout
    jaccard = float(result.stdout.split("Jaccard against the dataset's masks: mean ")[1].split(",")[0])
    assert jaccard >= 0.88  # at the stored resolution, after undoing the padding
    assert len(os.listdir(out)) == 144 and not any(f.endswith(".tmp.png") for f in os.listdir(out))
    some = sorted(os.listdir(out))[0]
    mask = cv2.imread(os.path.join(out, some), cv2.IMREAD_UNCHANGED)
    image = cv2.imread(os.path.join(manual, "boneage-training-dataset", some), cv2.IMREAD_UNCHANGED)
    if image is None:  # the id is in another split's folder
        import glob

        image = cv2.imread(glob.glob(os.path.join(manual, "*", some))[0], cv2.IMREAD_UNCHANGED)
    assert mask.shape == image.shape and set(np.unique(mask)) <= {0, 255}

    from boneage_jax import ops

    sample = ops.build_preprocess("hand_mask(source='cache')|resize_pad", image_size=64, mask_cache=out)(
        {"image": image, "id": int(some[:-4])})
    assert sample["mask"].shape == (64, 64)
    assert np.mean(sample["image"][sample["mask"] == 0] == 0) > 0.9  # background zeroed (resizing blurs edges)


def test_segment_refuses_a_bone_age_run(tiny_run, tmp_path, capsys):
    """A trained bone age run: one error line, exit status 2, nothing written (in this process:
    the test above runs the command as its own process)."""
    from boneage_jax import segment

    workdir = tiny_run
    assert segment.main([f"--workdir={workdir}", f"--out={tmp_path / 'm'}"]) == 2
    assert capsys.readouterr().err == f"error: {workdir} is not a segmentation run (config.task is 'boneage')\n"
    assert not os.path.exists(tmp_path / "m")
