r"""VGG19 with a spatial attention head (Nguyen et al.): published test MAE 16.28, RMSE 20.62 months.

    python -m boneage_jax.weights --from keras --model vgg19 \
        --in vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5 --out weights/vgg19
    python -m boneage_jax.main --config=configs/vgg19_attention.py --workdir=runs/vgg19_attention \
        --config.data.manual_dir=PATH/TO/RSNA --config.init_from=weights/vgg19

Reproduces: 384x384 RGB input, VGG19 features with the attention head (BatchNorm, 1x1 convs
to 64 and 16, locally connected 1x1 to a sigmoid map, RescaleGAP, Dropout, Dense 1024,
Dropout, Dense 1), class-balanced sampling (10 age bins x 500 images per epoch, sexes equal),
their augmentation preset (flip, shifts 15%, rotation 5 degrees, shear 0.01, zoom 25%, fill
nearest), batch 32, MAE loss. Their test set is 1,024 random validation images
(``data.test_from_validation``); sex is not an input (``sex_fusion='none'``).

Only the head trains: the VGG19 is frozen (``freeze=("backbone.vgg",)``), as in their table of
563,681 trainable of 20,589,601 parameters. Ours: 563,681 trainable, 20,024,384 frozen, plus
1,536 values Keras also counts as (non-trainable) parameters, the attention BatchNorm's 1,024
statistics and the 512 fixed ones of the 1x1 convolution that copies the map to 512 channels:
20,589,601 in all (``tests/test_freeze.py``). Fine-tuning the VGG19 too from step N:
``--config.unfreeze_at=N``; none at all: ``--config.freeze="()"``.

``--config=configs/vgg19_attention.py:tiny`` runs its data pipeline, head and objective in seconds
with a tiny CNN in place of VGG19 (frozen whole); ``:tiny_own_network`` keeps VGG19 at 64 px (see
``configs/common.py``).
"""

import ml_collections

from configs.common import base_config, with_variant


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = base_config()
    config.data.image_size = 384
    config.data.preprocess = "resize_pad"
    config.data.augment = "nguyen"
    config.data.normalize = "preprocess_input(mode='caffe')"
    config.data.sampling = "balanced"
    config.data.balance_bins = 10
    config.data.balance_per_bin = 500
    config.data.test_from_validation = 1024
    config.model.name = "vgg19_attention"
    config.model.sex_fusion = "none"
    config.freeze = ("backbone.vgg",)  # only the attention head trains
    config.loss = "mae"
    config.batch_size = 32
    config.eval_batch_size = 32
    config.num_epochs = 30.0
    config.learning_rate = 1e-4
    config.weight_decay = 0.0
    config.schedule = "constant"
    config.plateau_patience = 3
    config.early_stopping_patience = 6
    config.eval_every = 400
    config.checkpoint_every = 400
    return with_variant(config, variant, own_network_image_size=64)
