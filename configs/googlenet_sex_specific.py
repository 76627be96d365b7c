r"""Sex-specific GoogLeNet on ROI crops with histogram equalisation (Lee et al. 2020).

    python -m boneage_jax.main --config=configs/googlenet_sex_specific.py --workdir=runs/lee_female_roi1 \
        --config.data.manual_dir=PATH/TO/RSNA --config.data.sex=female --config.data.roi=roi1

Reproduces: separate models per sex (``--config.data.sex=male|female``; ``both`` trains one
model), each on 1,000 training images of that sex (``data.train_subset``); the region of
interest ``--config.data.roi=roi1|roi2|roi3`` (carpals and metacarpals; ROI1 grown 30% away
from the wrist; all phalanges, carpals and metacarpals), cropped from hand keypoints (a
``keypoints.csv`` beside the images: the phantoms have one; for RSNA images supply yours),
global histogram equalisation, GoogLeNet at 224 px with Caffe's ``preprocess_input``
(``--config.model.name=caffenet`` or ``resnet50`` for their other networks); sex is not an
input. Scored by MAD and CCC (``python -m boneage_jax.evaluate``). Published: MAD 8.89 months,
CCC 0.941 (GoogLeNet, female, ROI1).
``--config=configs/googlenet_sex_specific.py:tiny`` runs its data pipeline, head and objective in seconds
with a tiny CNN in place of GoogLeNet; ``:tiny_own_network`` keeps GoogLeNet at 64 px (see
``configs/common.py``).
"""

import ml_collections

from configs.common import base_config, with_variant


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = base_config()
    config.data.sex = "female"
    config.data.train_subset = 1000
    config.data.roi = "roi1"
    config.data.image_size = 224
    config.data.preprocess = "roi_crop|resize_pad|hist_eq"
    config.data.augment = "flip|affine(rotation=10, shift=0.05, zoom=0.1)"
    config.data.normalize = "preprocess_input(mode='caffe')"
    config.model.name = "googlenet"
    config.model.sex_fusion = "none"
    config.loss = "mae"
    config.batch_size = 32
    config.eval_batch_size = 32
    config.num_epochs = 60.0
    config.learning_rate = 1e-4
    config.weight_decay = 1e-4
    config.plateau_patience = 4
    config.early_stopping_patience = 8
    config.eval_every = 100
    config.checkpoint_every = 100
    return with_variant(config, variant, own_network_image_size=64)
