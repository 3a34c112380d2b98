"""Datasets by name: `create_dataset` builds the one `data.dataset` names (imagenet, generated, digits).

Each dataset yields `(image, label)`: a uint8 C x H x W tensor after its transform and an int, and has a
`num_classes` attribute. Datasets that draw random numbers (augmentation) own a `random.Random` that the
loader seeds per rank, epoch and worker through `reseed(seed)`, so augmentation neither depends on nor
disturbs the training process's global random state.

`data.num_train` / `data.num_val` set the size of the generated data; for imagenet and digits they cap
the split at that many images, taken at evenly spaced positions of the (class-sorted) list so that every
class keeps its share.

Modules: `imagefolder` (imagenet: an ImageNet-style folder, unreadable and unusual images), `builtin`
(generated images, scikit-learn's digits and their fixed split), `base` (errors, split names, the
reseeded random stream, evenly spaced subsets). Their public names are importable from here too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

from torch.utils.data import Dataset

from ipu_effnet.config import DATASETS
from ipu_effnet.data.base import SPLITS, DataError, DataWarning, split_name
from ipu_effnet.data.builtin import (
    DIGITS_NUM_IMAGES,
    DIGITS_VAL_PER_CLASS,
    GENERATED_DEFAULT_CLASSES,
    GENERATED_DEFAULT_SIZES,
    DigitsDataset,
    GeneratedDataset,
    digits_split,
)
from ipu_effnet.data.imagefolder import (
    ALPHA_FILL,
    ImageFolderDataset,
    UnreadableImages,
    image_extensions,
    prepare_mode,
)
from ipu_effnet.data.transforms import EvalTransform, TrainTransform

if TYPE_CHECKING:
    from ipu_effnet.config import DataConfig

__all__ = [
    "ALPHA_FILL",
    "DIGITS_NUM_IMAGES",
    "DIGITS_VAL_PER_CLASS",
    "GENERATED_DEFAULT_CLASSES",
    "GENERATED_DEFAULT_SIZES",
    "SPLITS",
    "DataError",
    "DataWarning",
    "DigitsDataset",
    "GeneratedDataset",
    "ImageFolderDataset",
    "UnreadableImages",
    "create_dataset",
    "digits_split",
    "image_extensions",
    "prepare_mode",
]


def create_dataset(data_cfg: DataConfig, split: str, resolution: int, train: bool,
                   num_classes: Optional[int] = None, seed: int = 0, randaugment: Optional[Callable] = None) -> Dataset:
    """The dataset `data_cfg.dataset` names, for `split` ("train" or "validation"; "val" accepted) at
    `resolution` (the caller picks it: data_cfg.eval_resolution, or the trained resolution when None),
    with training augmentation when `train`. `num_classes`: the model's (model.num_classes); it sets the
    classes of the generated data and must match the class count of imagenet and digits. `seed`: the
    content of the generated data (the digits split is fixed and ignores it). `randaugment`: a
    `data.randaugment.RandAugment` for the training images of imagenet and digits (generated images are
    tensors and skip it); training with evaluation preprocessing (fine-tuning) passes train=False."""
    split = split_name(split)
    limit = data_cfg.num_train if split == "train" else data_cfg.num_val
    kind = data_cfg.dataset
    dataset: Dataset
    if kind == "generated":
        size = limit if limit is not None else GENERATED_DEFAULT_SIZES[split]
        classes = num_classes if num_classes is not None else GENERATED_DEFAULT_CLASSES
        return GeneratedDataset(size, classes, resolution, seed=seed, split=split)
    if kind == "digits":
        dataset = DigitsDataset(split, resolution, train=train, limit=limit, randaugment=randaugment)
    elif kind == "imagenet":
        if not data_cfg.path:
            raise DataError("data.path is not set; the imagenet dataset needs a folder with "
                            "train/<class>/<image> and validation/<class>/<image> (or val/)")
        decoder = data_cfg.jpeg_decoder
        if train:
            transform = TrainTransform(resolution, randaugment=randaugment, decoder=decoder,
                                       resampler=data_cfg.resampler)
        else:
            transform = EvalTransform(resolution, decoder=decoder)
        dataset = ImageFolderDataset(data_cfg.path, split, transform, limit=limit,
                                     max_corrupt_fraction=data_cfg.max_corrupt_fraction,
                                     verify=data_cfg.verify_images)
    else:
        raise DataError(f"data.dataset = {kind!r} is not one of {', '.join(map(repr, DATASETS))}")
    found = dataset.num_classes  # type: ignore[attr-defined]
    if num_classes is not None and num_classes != found:
        raise DataError(f"model.num_classes = {num_classes} but the {kind} data has {found} classes; "
                        f"set model.num_classes={found}")
    return dataset
