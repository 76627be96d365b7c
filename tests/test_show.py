"""``python -m boneage_jax.tools.show`` renders one row per example and one column per stage."""

from __future__ import annotations

import os
import subprocess
import sys

import cv2

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def test_show_renders_the_stages(tiny_config, tmp_path):
    out = tmp_path / "grid.png"
    args = [f"--config.data.manual_dir={tiny_config.data.manual_dir}",
            f"--config.data.data_dir={tiny_config.data.data_dir}",
            "--config.data.preprocess=hand_mask(source='dataset')|align|roi_crop(region='roi2')|resize_pad|clahe"]
    result = subprocess.run([sys.executable, "-m", "boneage_jax.tools.show", "--config=configs/demo.py",
                             f"--out={out}", "--num=3", "--tile=96", *args],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    grid = cv2.imread(str(out))
    assert grid.shape == (20 + 3 * 96, 5 * 96, 3)
    raw_tile = grid[20:116, :96]
    # ROI boxes (coloured) and keypoints (red) are drawn on the grey radiograph.
    assert (abs(raw_tile[..., 0].astype(int) - raw_tile[..., 2].astype(int)) > 100).sum() > 20
    assert "3 examples x 5 stages" in result.stdout
