r"""U-Net hand segmentation (Memon & Cuomo 2019's mask stage) on image and mask pairs.

    python -m boneage_jax.main --config=configs/unet_segmentation.py --workdir=runs/unet \
        --config.data.manual_dir=data/phantom
    python -m boneage_jax.segment --workdir=runs/unet --out=data/unet_masks

Trains the U-Net (Ronneberger et al.: 4 levels, 64 base filters, dropout 0.5 at the end of the
contracting path) to predict the hand mask with binary cross-entropy plus Dice loss, and
reports the Jaccard index (IoU) per image (``jaccard_<split>.csv``) and on average
(``results.json``: raw, and after keeping the hand-sized component). Masks come from
``hand-masks/<id>.png`` beside the images: the phantom generator writes them; for the RSNA
images, supply your own (Memon & Cuomo annotated theirs). ``boneage_jax.segment`` then writes
the predicted masks of every split, which ``hand_mask(source='cache', cache_dir=...)`` reads.
Memon & Cuomo do not publish a Jaccard figure; the phantom check in the tests asks for 0.9.
``--config=configs/unet_segmentation.py:tiny`` runs it in seconds (32 px, depth 2, 4 base
filters, 6 steps; see ``configs/common.py``).
"""

import ml_collections

from configs.common import base_config, with_variant


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = base_config()
    config.task = "segmentation"
    config.data.manual_dir = "data/phantom"
    config.data.data_dir = "data/tfds"
    config.data.image_size = 256
    config.data.preprocess = "resize_pad"
    config.data.augment = "flip|affine(rotation=15, shift=0.05, zoom=0.1)"
    config.data.normalize = "value_range"
    config.data.mask_in_batch = True
    config.model.name = "unet"
    config.model.kwargs.depth = 4
    config.model.kwargs.base_filters = 64
    config.model.kwargs.dropout = 0.5
    config.model.kwargs.batch_norm = False
    config.model.sex_fusion = "none"
    config.batch_size = 8
    config.eval_batch_size = 16
    config.num_train_steps = 3000
    config.learning_rate = 1e-4
    config.weight_decay = 0.0
    config.warmup_steps = 100
    config.eval_every = 250
    config.checkpoint_every = 250
    return with_variant(config, variant, narrow={"base_filters": 4, "depth": 2})
