r"""InceptionV3 with a sex input: the 2017 RSNA challenge winner (16 Bit): MAE 4.26 months.

    python -m boneage_jax.weights --from keras --model inception_v3 \
        --in inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5 --out weights/inception_v3
    python -m boneage_jax.main --config=configs/inception_v3.py --workdir=runs/inception_v3 \
        --config.data.manual_dir=PATH/TO/RSNA --config.init_from=weights/inception_v3

Reproduces the winner's design: ImageNet InceptionV3 at 500x500, sex through Dense 32
concatenated to the pooled features, then Dense 1000, Dense 1000 and the bone-age output
(``sex_fusion='winner16bit'``), Keras ``preprocess_input`` ('tf'), flips and affine
augmentation, MAE loss on z-scored age. The winner's exact training schedule was not
published; ours is Adam with lr 1e-4 and reduce-on-plateau.
``--config=configs/inception_v3.py:tiny`` runs its data pipeline, head and objective in seconds
with a tiny CNN in place of InceptionV3; ``:tiny_own_network`` keeps InceptionV3 at 80 px (see
``configs/common.py``).
"""

import ml_collections

from configs.common import base_config, with_variant


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = base_config()
    config.data.image_size = 500
    config.data.preprocess = "resize_pad"
    config.data.augment = "flip|affine(rotation=20, shift=0.2, zoom=0.2)"
    config.data.normalize = "preprocess_input(mode='tf')|grey_to_rgb"
    config.model.name = "inception_v3"
    config.model.sex_fusion = "winner16bit"
    config.loss = "mae"
    config.batch_size = 16
    config.eval_batch_size = 32
    config.num_epochs = 50.0
    config.learning_rate = 1e-4
    config.weight_decay = 0.0
    config.schedule = "constant"
    config.plateau_patience = 3
    config.early_stopping_patience = 8
    config.eval_every = 790
    config.checkpoint_every = 790
    return with_variant(config, variant, own_network_image_size=80)
