r"""What this codebase learns from the 599 shared RSNA radiographs on a 2-core CPU.

    python -m launch.sweep --config=configs/rsna_small.py --workdir=runs/rsna_small --folds 5 \
        --set data.manual_dir=../shared/rsna_sample

(draft: numbers follow once measured)
"""

import ml_collections

from configs.common import base_config, with_variant


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = base_config()
    config.data.manual_dir = "../shared/rsna_sample"
    config.data.image_size = 160
    config.data.preprocess = ("hand_mask(source='classical')|roi_crop(region='hand', margin=1.1)|resize_pad"
                              "|clahe(clip_limit=2.0, tile_grid=8)")
    config.data.augment = "flip|affine(rotation=20, shift=0.05, zoom=0.1)"
    config.data.normalize = "preprocess_input(mode='torch')"
    config.model.name = "efficientnet_lite0"
    config.init_from = "imagenet"
    config.model.sex_fusion = "concat"
    config.model.head_hidden = (64,)
    config.model.dropout = 0.2
    config.batch_size = 16
    config.eval_batch_size = 32
    config.num_train_steps = 1000
    config.learning_rate = 1e-3
    config.weight_decay = 1e-4
    config.warmup_steps = 50
    config.log_every = 20
    config.eval_every = 200
    config.checkpoint_every = 200
    return with_variant(config, variant)
