r"""Deeplasia's recipe with EfficientNet-B0 (Rassmann et al.): their 3-model ensemble reached MAD 3.87.

    python -m boneage_jax.main --config=configs/efficientnet_b0.py --workdir=runs/effnet_b0 \
        --config.data.manual_dir=PATH/TO/RSNA --config.data.mask_cache=data/unet_masks
    python -m boneage_jax.evaluate --workdir=runs/effnet_b0 --ensemble=runs/effnet_b0_s1,runs/effnet_b0_s2

Reproduces: hand masks (``hand_mask(source='cache')`` from ``python -m boneage_jax.segment``;
``source='dataset'`` for phantoms, which carry masks), background removed, crop to the mask
box with margin 1.15, 512x512, one grey channel into a 1-channel stem, their augmentation:
horizontal flip, affine (rotation 30 degrees, shifts 20%, shear 10 degrees, scale 0.8-1.25),
then CLAHE (clip 1-3) or gamma (0.7-1.3) chosen at random; per-image z-score after
subtracting the 1st percentile; sex concatenated (a dense sex embedding in Deeplasia); MSE on
z-scored age, AdamW with cosine decay. Deeplasia's sharpening augmentation (p 0.2) is not
implemented. Their ensemble of three models scored MAD 3.87 months.
``--config=configs/efficientnet_b0.py:tiny`` runs its data pipeline, head and objective in seconds
with a tiny CNN in place of EfficientNet-B0; ``:tiny_own_network`` keeps EfficientNet-B0 at 64 px (see
``configs/common.py``).
"""

import ml_collections

from configs.common import base_config, with_variant


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = base_config()
    config.data.image_size = 512
    config.data.builder_config = "max1024"
    config.data.mask_cache = "data/unet_masks"
    config.data.preprocess = "hand_mask(source='cache')|roi_crop(region='hand', margin=1.15)|resize_pad"
    config.data.augment = ("flip|affine(rotation=30, shift=0.2, shear=10, zoom_range=(0.8, 1.25))"
                           "|clahe_or_gamma")
    config.data.normalize = "percentile_zscore"
    config.model.name = "efficientnet_b0"
    config.model.sex_fusion = "concat"
    config.model.head_hidden = (256,)
    config.loss = "mse"
    config.batch_size = 24
    config.eval_batch_size = 32
    config.num_epochs = 60.0
    config.learning_rate = 1e-3
    config.weight_decay = 1e-4
    config.warmup_steps = 500
    config.eval_every = 525
    config.checkpoint_every = 525
    return with_variant(config, variant, own_network_image_size=64)
