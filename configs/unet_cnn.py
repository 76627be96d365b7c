r"""U-Net hand masks, CLAHE, rotation alignment and the 4-layer CNN with 5-fold CV (Memon & Cuomo 2019).

    python -m boneage_jax.main --config=configs/unet_segmentation.py --workdir=runs/unet \
        --config.data.manual_dir=PATH/WITH/MASKS
    python -m boneage_jax.segment --workdir=runs/unet --out=data/unet_masks \
        --manual_dir=PATH/TO/RSNA
    python -m launch.sweep --config=configs/unet_cnn.py --folds 5 --workdir=runs/unet_cnn \
        --set data.manual_dir=PATH/TO/RSNA --set data.mask_cache=data/unet_masks

Reproduces: the hand mask from the U-Net (``hand_mask(source='cache')``; the classical Otsu
mask with ``--config.data.preprocess="hand_mask(source='classical')|align|..."`` when no
U-Net is trained), background removed, rotation so that the hand's long axis is vertical,
crop to the hand, aspect-preserving resize to 256x256 padded white as in the paper, CLAHE,
one grey channel, the paper's CNN (four 3x3 convolutions with 16/32/64/128 filters, ReLU, 2x2
max pooling, flatten, dense) with sex concatenated, 5-fold cross-validation over the training
set (``data.num_folds=5``, ``data.fold=0..4``; ``launch.sweep --folds 5`` runs and averages
them). Memon & Cuomo report their accuracy per fold in their paper's tables; we quote no
single number for it.
``--config=configs/unet_cnn.py:tiny`` runs it in seconds (32 px, 4 and 8 filters, 6 steps; see
``configs/common.py``).
"""

import ml_collections

from configs.common import base_config, with_variant


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = base_config()
    config.data.image_size = 256
    config.data.mask_cache = "data/unet_masks"
    config.data.preprocess = ("hand_mask(source='cache')|align|roi_crop(region='hand', margin=1.05)"
                              "|resize_pad(pad_value=255)|clahe(clip_limit=2.0, tile_grid=8)")
    config.data.augment = "flip|affine(rotation=5, shift=0.05, zoom=0.05, fill_mode='nearest')"
    config.data.normalize = "value_range"
    config.data.num_folds = 5
    config.data.fold = 0
    config.model.name = "cnn_memon"
    config.model.kwargs.pool = "flatten"
    config.model.kwargs.filters = (16, 32, 64, 128)
    config.model.sex_fusion = "concat"
    config.model.head_hidden = (256,)
    config.model.dropout = 0.3
    config.batch_size = 32
    config.num_epochs = 40.0
    config.learning_rate = 1e-3
    config.plateau_patience = 3
    config.early_stopping_patience = 6
    config.eval_every = 350
    config.checkpoint_every = 350
    return with_variant(config, variant, narrow={"filters": (4, 8)})
