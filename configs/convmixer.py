r"""ConvMixer regressor (Cakmakci 2023): published test MAE 9.01 months on RSNA.

    python -m boneage_jax.main --config=configs/convmixer.py --workdir=runs/convmixer \
        --config.data.manual_dir=PATH/TO/RSNA

Reproduces: ConvMixer at 256x256 (here ConvMixer-768/32: kernel 7, patch 7, ReLU; choose
another with ``--config.model.name=convmixer_1536_20`` etc.), CLAHE, the 2017 winner's sex head,
AdamW (lr 1e-3), batch 8, MSE loss with MAE reported, reduce-on-plateau and early stopping.
Trained from scratch (no ImageNet ConvMixer weights in Keras; PyTorch weights import with
``python -m boneage_jax.weights --from torch --model convmixer_768_32``).
``--config=configs/convmixer.py:tiny`` runs its data pipeline, head and objective in seconds
with a tiny CNN in place of ConvMixer; ``:tiny_own_network`` keeps ConvMixer at 64 px (see
``configs/common.py``).
"""

import ml_collections

from configs.common import base_config, with_variant


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = base_config()
    config.data.image_size = 256
    config.data.preprocess = "resize_pad|clahe(clip_limit=2.0, tile_grid=8)"
    config.data.augment = "flip|affine(rotation=15, shift=0.05, zoom=0.1)"
    config.data.normalize = "preprocess_input(mode='torch')"
    config.model.name = "convmixer_768_32"
    config.model.sex_fusion = "winner16bit"
    config.loss = "mse"
    config.batch_size = 8
    config.eval_batch_size = 32
    config.num_epochs = 50.0
    config.learning_rate = 1e-3
    config.weight_decay = 1e-5
    config.schedule = "constant"
    config.grad_clip_norm = 1.0
    config.plateau_patience = 3
    config.early_stopping_patience = 8
    config.eval_every = 1580  # one epoch at batch 8
    config.checkpoint_every = 1580
    return with_variant(config, variant, own_network_image_size=64)
