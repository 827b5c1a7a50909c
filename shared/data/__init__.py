"""Image datasets for both stages: opened lazily, decoded in DataLoader workers, batched by step.

`--dataset` accepts:
- `digits`: scikit-learn's 1,797 handwritten 8x8 digits, labels 0-9, a fixed seeded 90/10 train/test split;
- `shapes`: generated 64x64 images of one or two coloured shapes with captions (`shared.data.shapes`);
- a local image folder: class subfolders become labels, `train/`, `test/`, `validation/` subfolders
  become splits; the tree is listed once, with `os.scandir`, into a compact path table;
- a folder written with `Dataset.save_to_disk` / `DatasetDict.save_to_disk`;
- a Hub dataset name (`--dataset-config`, `--revision`, `--image-column`, `--label-column` apply).

Captions (`--caption-column`, default `text` where a source has it) come from a string column of a
datasets source, or from an image folder's `metadata.jsonl` (`file_name`, `text`) as `datasets`'
imagefolder reads it (`shared.data.captions`).

Opening a source reads no image. Images are decoded where they are used: in DataLoader worker
processes during training, evaluation and export. A small split (see `CACHE_LIMIT_BYTES`) is
decoded once into memory as uint8 instead, because re-decoding it every epoch would cost more.
Batches are a pure function of (seed, step), so a resumed run, with any number of workers, sees
exactly the batches of the uninterrupted run.

Reading order: `config` (the flags), `images` (one image), `sources` (opening a source), `datasets`
(a split as a torch dataset), `loaders` (batches in a fixed order), `splits` (what the commands use).
"""
from shared.data.captions import check_captions
from shared.data.config import (DIGITS, HELD_OUT_SPLITS, NO_LABEL, VALIDATION_SEED, DataConfig, check_num_workers,
                                resolve_num_workers)
from shared.data.datasets import Batch, Example, ImageDataset, collate_examples, warn_substituted
from shared.data.images import (Augmentation, ImageProblem, augment, augmentation_draws, channels_of, decode_image,
                                resize_and_centre_crop, save_image_grid, to_8bit, to_model_range)
from shared.data.loaders import (CACHE_LIMIT_BYTES, CachedImages, StepBatchSampler, StepOrder, code_batches,
                                 sequential_batches, should_cache, training_batches)
from shared.data.sources import ArrowRows, FolderRows, Listing, Source, open_source
from shared.data.splits import (first_image_channels, held_out_indices, held_out_split, load_split,
                                load_train_and_validation, make_dataset, shard_range)

__all__ = ["ArrowRows", "Augmentation", "Batch", "CACHE_LIMIT_BYTES", "CachedImages", "DIGITS", "check_captions", "DataConfig",
           "Example", "FolderRows", "HELD_OUT_SPLITS", "ImageDataset", "ImageProblem", "Listing", "NO_LABEL", "Source",
           "StepBatchSampler", "StepOrder", "VALIDATION_SEED", "augment", "augmentation_draws", "channels_of",
           "check_num_workers", "code_batches", "collate_examples", "decode_image", "first_image_channels",
           "held_out_indices", "held_out_split", "load_split", "load_train_and_validation", "make_dataset",
           "open_source", "resize_and_centre_crop", "resolve_num_workers", "save_image_grid", "sequential_batches",
           "shard_range", "should_cache", "to_8bit", "to_model_range", "training_batches", "warn_substituted"]
