r"""Age-range classifiers with sex as a parallel input (Hamrouni & Hassen).

    python -m boneage_jax.main --config=configs/age_classes.py --workdir=runs/classes_resnet50_3 \
        --config.data.manual_dir=PATH/TO/RSNA --config.model.name=resnet50 --config.model.num_classes=3

Reproduces: 3, 5 or 10 equal-width age classes (``--config.model.num_classes``, as
``pandas.cut`` makes them) with cross-entropy; the expected age of the class probabilities is
reported as MAE too. Models ``cnn_hamrouni`` (their customised CNN, default),
``efficientnet_b0``, ``inception_v3`` and ``resnet50`` (``--config.model.name``); sex
concatenated to the pooled features; bilateral filter, PIL-style brightness and contrast
enhancement and CLAHE; Adam (lr 1e-3, no weight decay), batch 64, early stopping. Published
validation accuracy, e.g. ResNet 84.36% with 3 classes.
``--config=configs/age_classes.py:tiny`` runs it in seconds (32 px, 4 and 8 filters, 6 steps;
see ``configs/common.py``).
"""

import ml_collections

from configs.common import base_config, with_variant


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = base_config()
    config.data.image_size = 224
    config.data.preprocess = ("resize_pad|bilateral(diameter=9, sigma_color=75.0, sigma_space=75.0)"
                              "|enhance(brightness=1.2, contrast=1.2)|clahe(clip_limit=2.0, tile_grid=8)")
    config.data.augment = "flip|affine(rotation=10, shift=0.05, zoom=0.1)"
    config.data.normalize = "value_range|grey_to_rgb"
    config.model.name = "cnn_hamrouni"
    config.model.head = "classification"
    config.model.num_classes = 3
    config.model.sex_fusion = "concat"
    config.batch_size = 64
    config.eval_batch_size = 64
    config.num_epochs = 30.0
    config.learning_rate = 1e-3
    config.weight_decay = 0.0
    config.schedule = "constant"
    config.early_stopping_patience = 5
    config.eval_every = 200
    config.checkpoint_every = 200
    return with_variant(config, variant, narrow={"filters": (4, 8)})
