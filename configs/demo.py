r"""The quick CPU demo: a small CNN in the style of Memon & Cuomo on phantom radiographs at 128 px.

    python -m tfds_rsna.phantom --out data/phantom --num_train 2000 --num_validation 200 \
        --num_test 200 --seed 0
    python -m boneage_jax.main --config=configs/demo.py --workdir=runs/demo

It is what ``make demo`` runs. It reproduces no paper: it shows the whole path from files to a
trained, checkpointed and evaluated model in minutes on a laptop CPU, and must reach a test
MAE of at most a third of the predict-the-training-mean baseline on the phantoms.
Point it at real radiographs with ``--config.data.manual_dir=PATH``.
``--config=configs/demo.py:tiny`` is the same path in seconds (32 px, 4 and 8 filters, 6 steps of
batch 8: the tests' run; ``configs/common.py`` has the variants).
"""

import ml_collections

from configs.common import base_config, with_variant


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = base_config()
    config.data.manual_dir = "data/phantom"
    config.data.data_dir = "data/tfds"
    config.data.image_size = 128
    config.data.preprocess = "resize_pad|clahe(clip_limit=2.0, tile_grid=8)"
    config.data.augment = "flip|affine(rotation=10, shift=0.05, zoom=0.05)"
    config.model.name = "cnn_memon"
    config.model.kwargs.pool = "avg"
    config.model.kwargs.filters = (8, 16, 32, 64, 128)  # narrow early layers (CPU time), one stage more
    config.model.kwargs.batch_norm = True
    config.model.sex_fusion = "concat"
    config.model.head_hidden = (64,)
    config.batch_size = 32
    config.num_train_steps = 1500
    config.learning_rate = 2e-3
    config.warmup_steps = 50
    config.log_every = 50
    config.eval_every = 250
    config.checkpoint_every = 250
    return with_variant(config, variant, narrow={"filters": (4, 8)})
