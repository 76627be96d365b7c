r"""Xception regressor (Cakmakci 2023): published test MAE 7.63 months on RSNA.

    python -m boneage_jax.weights --from keras --model xception \
        --in xception_weights_tf_dim_ordering_tf_kernels_notop.h5 --out weights/xception
    python -m boneage_jax.main --config=configs/xception.py --workdir=runs/xception \
        --config.data.manual_dir=PATH/TO/RSNA --config.init_from=weights/xception

Reproduces: Xception (ImageNet weights) at 500x500 with the 2017 winner's sex head (sex ->
Dense 32, concatenated, Dense 1000, Dense 1000, output), CLAHE, Keras ``preprocess_input``
('tf' mode: [-1, 1]), AdamW (lr 1e-4, weight decay 1e-5), batch 16, MSE loss with MAE reported,
reduce-on-plateau and early stopping on validation MAE. The augmentation is our choice (the
paper does not list one). Without ``init_from`` the network trains from scratch.
``--config=configs/xception.py:tiny`` runs its data pipeline, head and objective in seconds
with a tiny CNN in place of Xception; ``:tiny_own_network`` keeps Xception at 80 px (see
``configs/common.py``).
"""

import ml_collections

from configs.common import base_config, with_variant


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = base_config()
    config.data.builder_config = "max512"
    config.data.image_size = 500
    config.data.preprocess = "resize_pad|clahe(clip_limit=2.0, tile_grid=8)"
    config.data.augment = "flip|affine(rotation=15, shift=0.05, zoom=0.1)"
    config.data.normalize = "preprocess_input(mode='tf')|grey_to_rgb"
    config.model.name = "xception"
    config.model.sex_fusion = "winner16bit"
    config.model.head = "regression"
    config.loss = "mse"
    config.batch_size = 16
    config.eval_batch_size = 32
    config.num_epochs = 50.0
    config.learning_rate = 1e-4
    config.weight_decay = 1e-5
    config.schedule = "constant"
    config.plateau_patience = 3
    config.plateau_factor = 0.5
    config.early_stopping_patience = 8
    config.eval_every = 790  # about one epoch of the 12,611 training images
    config.checkpoint_every = 790
    config.log_every = 50
    return with_variant(config, variant, own_network_image_size=80)
