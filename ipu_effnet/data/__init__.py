"""Data: datasets (an ImageNet folder, generated images, scikit-learn's digits), transforms, loaders.

Images leave this package as uint8 N x C x H x W batches with int64 labels; mean/std normalisation
happens on the device, in the model wrapper (docs/reference.md section 6). Preprocessing follows Graphcore's
recipe: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) + horizontal flip for training, shorter side to
res / 0.875 then a centre crop for evaluation, JPEGs decoded at reduced scale where the output is much
smaller than the image.

    from ipu_effnet.data import create_dataset, create_loader
    train_set = create_dataset(cfg.data, "train", resolution=160, train=True,
                               num_classes=cfg.model.num_classes, seed=cfg.train.seed)
    loader = create_loader(train_set, cfg.train.micro_batch, train=True, workers=cfg.data.workers,
                           seed=cfg.train.seed, rank=rank, world_size=world_size)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)             # order and augmentation are a function of (seed, epoch)
        for images, labels in loader: ...   # uint8 (N, 3, 160, 160), int64 (N,)

Modules: `datasets` (`create_dataset`, and the names of the three dataset modules: `imagefolder` for
imagenet, `builtin` for the generated images and the digits with their split, `base` for what they
share), `transforms` (crop boxes, JPEG draft decoding, the train and eval transforms), `loader`
(sharded sampler, worker seeding, `collate`, `create_loader`).
"""

from __future__ import annotations

from ipu_effnet.data.datasets import (
    DIGITS_NUM_IMAGES,
    DIGITS_VAL_PER_CLASS,
    GENERATED_DEFAULT_CLASSES,
    GENERATED_DEFAULT_SIZES,
    SPLITS,
    DataError,
    DigitsDataset,
    GeneratedDataset,
    ImageFolderDataset,
    create_dataset,
    digits_split,
    image_extensions,
)
from ipu_effnet.data.loader import (
    Loader,
    ShardedSampler,
    WorkerInit,
    collate,
    create_loader,
    worker_seed,
)
from ipu_effnet.data.transforms import (
    EVAL_CROP_FRACTION,
    EvalTransform,
    TrainTransform,
    decode_region,
    eval_crop_box,
    random_resized_crop_box,
    random_translate,
    resize_region,
    to_uint8_tensor,
)

__all__ = [
    "DIGITS_NUM_IMAGES",
    "DIGITS_VAL_PER_CLASS",
    "EVAL_CROP_FRACTION",
    "GENERATED_DEFAULT_CLASSES",
    "GENERATED_DEFAULT_SIZES",
    "SPLITS",
    "DataError",
    "DigitsDataset",
    "EvalTransform",
    "GeneratedDataset",
    "ImageFolderDataset",
    "Loader",
    "ShardedSampler",
    "TrainTransform",
    "WorkerInit",
    "collate",
    "create_dataset",
    "create_loader",
    "decode_region",
    "digits_split",
    "eval_crop_box",
    "image_extensions",
    "random_resized_crop_box",
    "random_translate",
    "resize_region",
    "to_uint8_tensor",
    "worker_seed",
]
