"""Defaults shared by every config: each config file starts from ``base_config()`` and ends with
``with_variant(config, variant, ...)``.

A config file's ``get_config(variant="")`` returns the published setting; the variant after a
colon in the flag shrinks it (``--config=configs/demo.py:tiny``):

- ``tiny``: seconds on a CPU (32 px, batch 8, 6 steps, a few filters); a config whose network
  is ImageNet-sized runs a tiny CNN in its place, so its data pipeline, head and objective
  still run end to end (what ``tests/test_configs.py`` runs for every config); where the
  config freezes part of its network, the tiny CNN is frozen whole (``freeze=("backbone",)``);
- ``tiny_own_network``: the same, but with the config's own network at the smallest input it
  takes (minutes to compile for the ImageNet-sized ones: ``make test-slow``).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

VARIANTS = ("", "tiny", "tiny_own_network")
TINY_IMAGE_SIZE = 32
# What a tiny variant trains in place of an ImageNet-sized network.
TINY_NETWORK = {"name": "cnn_memon", "kwargs": {"pool": "avg", "filters": (4, 8)}}


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.task = "boneage"  # boneage, or segmentation (U-Net hand masks; see configs/unet_segmentation.py)

    config.data = data = ml_collections.ConfigDict()
    data.manual_dir = ""  # the RSNA download (Kaggle or official layout) or a phantom folder
    data.data_dir = ""  # root of the prepared data, one folder per source; empty: ~/tensorflow_datasets/boneage_jax
    data.builder_config = "max512"  # stored resolution: original, max1024 or max512
    data.image_size = 256
    data.validation_fraction = 0.1  # held out of train when the data has no validation split
    data.preprocess = "resize_pad"  # uint8 ops for every split (see boneage_jax/ops/)
    data.augment = ""  # uint8 ops for training only
    data.normalize = "zscore"  # last ops: to float32, channels
    data.num_threads = 0  # grain read threads per process; 0: the CPUs this process may use / local processes
    data.prefetch = 64  # grain prefetch buffer (examples)
    data.num_workers = 0  # grain worker processes (0: threads in the main process)
    # decode + data.preprocess once per image, kept in memory (S*S bytes each); None: the training split when the
    # run reads it at least once over and it fits in a quarter of the available memory (input_pipeline.py)
    data.cache_preprocessed = config_dict.placeholder(bool)
    data.normalize_on_device = True  # training batches: uint8 grey + each image's data.normalize table (256, C)
    data.augment_on_device = False  # data.augment (flips, one affine) drawn on the host, warped on the device
    data.sex = "both"  # both, male or female (sex-specific models, Lee et al.)
    data.min_age = 0.0  # months, inclusive: keep only labelled images in [min_age, max_age]
    data.max_age = 240.0
    data.num_folds = 0  # k > 1: k-fold cross-validation on train, fold data.fold validates
    data.fold = 0
    data.sampling = "shuffle"  # shuffle, or balanced (Nguyen et al.: equal draws per age bin and sex)
    data.balance_bins = 10  # balanced: equal-width bone-age bins over the training range
    data.balance_per_bin = 500  # balanced: images drawn per bin and epoch, half of each sex
    data.mask_in_batch = False  # batches carry the hand mask (segmentation)
    data.test_from_validation = 0  # n > 0: the test split is n random validation images (Nguyen et al.)
    data.train_subset = 0  # n > 0: train on n random training images (after the filters)
    data.roi = "hand"  # default region of the roi_crop op: hand, roi1, roi2 or roi3 (Lee et al.)
    data.mask_cache = ""  # default cache_dir of hand_mask(source='cache'): python -m boneage_jax.segment --out

    config.model = model = ml_collections.ConfigDict()
    model.name = "cnn_memon"
    model.kwargs = ml_collections.ConfigDict()  # family-specific arguments
    model.sex_fusion = "winner16bit"  # none, concat or winner16bit
    model.head = "regression"  # regression, gaussian or classification (see boneage_jax/objectives.py)
    model.num_classes = 3  # classification: equal-width age ranges, as pandas.cut makes them
    model.class_edges = ()  # classification: explicit range edges in months (overrides num_classes)
    model.head_hidden = ()  # extra dense layers before the output
    model.dropout = 0.0
    model.dtype = "float32"  # compute dtype: float32 or bfloat16 (parameters stay float32)
    config.init_from = ""  # pretrained backbone: python -m boneage_jax.weights --out DIR, or "imagenet"; head fresh
    # Frozen parameters (boneage_jax/freeze.py): glob patterns of dotted parameter paths, e.g. ("backbone",)
    # or ("backbone", "!backbone.block5_*"); no update, no weight decay, their BatchNorm on stored statistics.
    config.freeze = ()
    config.unfreeze_at = 0  # from this step on the frozen parameters train too (head first, then all); 0: never
    config.unfreeze_at_epoch = 0.0  # the same in epochs; if > 0, overrides unfreeze_at
    config.cache_features = False  # whole backbone frozen, no augmentation: features computed once, the head trains on them

    config.batch_size = 32
    config.eval_batch_size = 64
    config.num_train_steps = 1000
    config.num_epochs = 0.0  # if > 0, overrides num_train_steps
    config.loss = "mse"  # regression head, on z-scored bone age: mse, mae or huber
    config.learning_rate = 1e-3
    config.weight_decay = 1e-4
    config.adam_b1 = 0.9
    config.adam_b2 = 0.999
    config.schedule = "cosine"  # constant or cosine (both after linear warm-up)
    config.warmup_steps = 0
    config.final_lr_fraction = 0.0
    config.grad_clip_norm = 0.0  # 0: no clipping
    config.plateau_patience = 0  # evaluations without improvement before the LR drops; 0: off
    config.plateau_factor = 0.5
    config.plateau_min_scale = 1e-3
    config.early_stopping_patience = 0  # evaluations without improvement before stopping; 0: off
    config.min_delta = 0.0  # validation MAE improvement (months) that counts

    config.log_every = 50
    config.eval_every = 500
    config.checkpoint_every = 500
    config.on_damaged_checkpoint = "stop"  # the latest checkpoint cannot be read: stop, or resume from "previous"
    return config


def with_variant(config: ml_collections.ConfigDict, variant: str, *, narrow: dict | None = None,
                 own_network_image_size: int = TINY_IMAGE_SIZE) -> ml_collections.ConfigDict:
    """``config`` itself for variant ``""``; shrunk to seconds for ``tiny`` and ``tiny_own_network``.

    ``narrow``: ``model.kwargs`` that make the config's own network tiny (its widths and depth);
    ``None`` for an ImageNet-sized network, which ``tiny`` replaces by ``TINY_NETWORK`` and
    ``tiny_own_network`` keeps at ``own_network_image_size`` px (the smallest it takes).
    """
    if variant not in VARIANTS:
        raise ValueError(f"config variant {variant!r} is unknown: use one of {', '.join(map(repr, VARIANTS))} "
                         "(e.g. --config=configs/demo.py:tiny)")
    if not variant:
        return config
    data = config.data
    data.builder_config = "max512"  # one prepared store for every config
    data.image_size = TINY_IMAGE_SIZE
    data.num_threads = 1
    data.prefetch = 8
    data.test_from_validation = min(data.test_from_validation, 8)
    data.balance_per_bin = min(data.balance_per_bin, 4)
    model = config.model
    if narrow is not None:
        model.kwargs.update(narrow)
    elif variant == "tiny":
        model.name = TINY_NETWORK["name"]
        model.kwargs = ml_collections.ConfigDict(TINY_NETWORK["kwargs"])
        if config.freeze:  # the tiny network stands for the frozen part of the config's own
            config.freeze = ("backbone",)
    else:
        data.image_size = max(TINY_IMAGE_SIZE, own_network_image_size)
    if model.head_hidden:
        model.head_hidden = (8,)
    config.batch_size = 8
    config.eval_batch_size = 8
    config.num_epochs = 0.0
    config.num_train_steps = 6
    config.warmup_steps = 0
    config.log_every = 2
    config.eval_every = 3
    config.checkpoint_every = 2
    return config
