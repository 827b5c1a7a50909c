"""Sample quality of a pipeline against a dataset split, as one JSON line:
`python -m pipelines.evaluate --pipeline DIR --dataset digits --split test --features runs/digit-features`.

Generated images and the reference split go through one feature network: `--features inception` (the
FID Inception network, pool3, from its local weights file; nothing is downloaded) or `--features
FOLDER`, a feature network trained by `python -m pipelines.features` (the usual choice for MNIST-like
data). From the features: FID (Heusel et al. 2017) and precision and recall (Kynkaanniemi et al. 2019,
k = 3 nearest neighbours), computed by torch-fidelity; with a feature network and a class-conditional
pipeline, also the class accuracy of the samples (the network's prediction against the label asked for). A
text-conditioned pipeline is prompted with the reference split's captions in row order; on `shapes` the
result also holds the checker's caption accuracy of the samples.

FID is biased upwards for small sets and depends on every detail of the protocol, so the JSON records
the whole protocol (the feature network and its weights' sha256, the reference split and count, the
sample count, seed and every sampling option) and the noise floor beside every FID: the FID between
the reference set and a disjoint set of real images (from --noise-floor-split) of the sample count.
Two numbers compare only with the same protocol. `--npz PATH` writes the samples as uint8 (N, H, W, 3)
under `arr_0`, the batch layout OpenAI's ADM evaluator reads, so published numbers can be reproduced there.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from pipelines.captions import caption_accuracy
from pipelines.feature_network import FeatureNetwork, InceptionFeatures
from pipelines.parts import add_sampling_arguments, sampling_keywords
from pipelines.pipeline import Pipeline
from shared.config import parse_args, write_json_atomic
from shared.data import (ImageDataset, first_image_channels, load_split, open_source, resolve_num_workers,
                         sequential_batches)
from shared.data.captions import check_captions
from shared.data.shapes import SHAPES
from shared.errors import UserError, run_cli
from shared.files import WEIGHTS_NAME, file_sha256
from stage1_vqvae.evaluate import add_fid_arguments, add_source_arguments, data_config_for

NEIGHBOURHOOD = 3  # k of precision and recall (Kynkaanniemi et al. 2019, sec. 3)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Sample quality (FID, precision, recall, class accuracy) of a "
                                                 "pipeline against a dataset split.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="a pipeline folder (Pipeline.save_pretrained)")
    add_source_arguments(parser, default_split="test")
    parser.add_argument("--num-images", type=int, default=1000, help="samples to generate (at least 2)")
    parser.add_argument("--features", default="inception",
                        help="inception (the FID network, from --inception-weights), or a feature network folder "
                             "written by `python -m pipelines.features`")
    add_fid_arguments(parser)
    parser.add_argument("--noise-floor-split", default="train",
                        help="the split the noise floor's real images come from; when it is --split, they are "
                             "drawn from it and the reference is the rest, so the two sets never share a row")
    parser.add_argument("--labels", type=int, nargs="+", default=None,
                        help="one class for every sample, or one per sample (default: classes drawn from the seed)")
    add_sampling_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64, help="samples and reference images per batch")
    parser.add_argument("--npz", default=None, help="also write the samples here, as ADM's evaluator reads them")
    parser.add_argument("--output", default=None, help="also write the JSON result to this file")
    parser.add_argument("--strict-images", action="store_true",
                        help="stop at an unreadable reference image; without it such an image is replaced by the next "
                             "readable row (which then counts twice) and the replacements are counted")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return parser


def load_features(spec: str, inception_weights: str | None, device: torch.device):
    """(the feature network, a description of it for the protocol)."""
    if spec == "inception":
        network = InceptionFeatures(inception_weights).to(device)
        return network, {"name": "inception-v3-compat pool3", "weights": str(network.path),
                         "sha256": file_sha256(network.path)}
    folder = Path(spec)
    if not folder.is_dir():
        raise UserError(f"--features {spec} is neither 'inception' nor a folder; train one with "
                        "`python -m pipelines.features` or pass inception")
    network = FeatureNetwork.from_pretrained(folder).to(device).eval()  # one-line errors for other folders
    return network, {"name": f"FeatureNetwork ({network.config.dataset})", "folder": str(folder.resolve()),
                     "sha256": file_sha256(folder / WEIGHTS_NAME)}


def floor_row_indices(num_rows: int, count: int, seed: int) -> np.ndarray:
    """`count` sorted row indices drawn from `num_rows` by the seed: the noise floor's real images."""
    return np.sort(np.random.RandomState(seed).permutation(num_rows)[:count])


def subset(dataset: ImageDataset, indices: np.ndarray) -> ImageDataset:
    """The rows `indices` of a split, as a dataset of their own."""
    return ImageDataset(dataset.source, dataset.split, dataset.rows.select(indices), dataset.image_size,
                        dataset.channels, strict=dataset.strict)


def reference_prompts(reference: ImageDataset, num_images: int, where: str, strict: bool) -> list[str]:
    """A text-conditioned pipeline's prompts: the captions of the reference's rows in row order, repeated as needed
    (the protocol of text-to-image FID: captions of the reference set). Rows without one are skipped with a
    warning (refused with `strict`)."""
    if reference.captions is None:
        raise UserError(f"this pipeline reads prompts and {where} has no captions to take them from: evaluate it on "
                        "a captioned split (drop --caption-column none, or name the column with --caption-column)")
    check_captions(reference.captions, where, strict)
    captions = [caption for caption in reference.captions if caption is not None]
    if not captions:
        raise UserError(f"no row of {where} has a caption to prompt this pipeline with; evaluate it on a captioned "
                        "split")
    return [captions[index % len(captions)] for index in range(num_images)]


def features_of(network, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return network.features(images).cpu()


def frechet_distance(first: torch.Tensor, second: torch.Tensor) -> float:
    """FID between two feature sets (N, F) and (M, F), by torch-fidelity."""
    if min(len(first), len(second)) < 2:
        raise UserError(f"FID needs at least 2 images in each set, got {len(first)} and {len(second)}")
    statistics = [fid_features_to_statistics(features.double()) for features in (first, second)]
    return float(fid_statistics_to_metric(*statistics, verbose=False)[torch_fidelity.KEY_METRIC_FID])


def evaluate(argv: Sequence[str] | None = None) -> dict:
    """Parse flags, generate, compare; returns (and prints) the result with its protocol."""
    args = parse_args(parser(), argv)
    if args.num_images <= NEIGHBOURHOOD:
        raise UserError(f"--num-images must be at least {NEIGHBOURHOOD + 1} (precision and recall compare each image "
                        f"with its {NEIGHBOURHOOD} nearest neighbours), got {args.num_images}")
    if args.npz is not None and Path(args.npz).exists():
        raise UserError(f"--npz {args.npz} already exists; remove it or choose another path")
    # every check that can refuse the run comes before the first sample: pipeline, data, options, features
    pipeline = Pipeline.from_pretrained(args.pipeline)
    tokenizer = pipeline.tokenizer
    data_config = data_config_for(args, tokenizer, args.strict_images)
    source = open_source(data_config)
    channels = first_image_channels(source, args.split, data_config.channels,
                                    fix=f"this pipeline makes {tokenizer.config.in_channels}-channel images")
    labels = args.labels[0] if args.labels and len(args.labels) == 1 else args.labels
    all_labels = pipeline.resolve_labels(args.num_images, labels, args.seed)
    options = sampling_keywords(args)
    samplers = pipeline.samplers(**options)
    network, description = load_features(args.features, args.inception_weights, pipeline.device)
    reference = load_split(data_config, source=source, channels=channels)
    if args.noise_floor_split == args.split:  # one split: the floor's rows are drawn from it, the reference is the rest
        if len(reference) < 2 * (NEIGHBOURHOOD + 1):
            raise UserError(f"{args.dataset} [{args.split}] has {len(reference)} images; a noise floor from the same "
                            f"split needs at least {2 * (NEIGHBOURHOOD + 1)}: pass --noise-floor-split with another split")
        floor_rows = floor_row_indices(len(reference), min(args.num_images, len(reference) // 2), args.seed)
        floor_set = subset(reference, floor_rows)
        reference = subset(reference, np.setdiff1d(np.arange(len(reference)), floor_rows))
    else:
        source.check_split(args.noise_floor_split)
        floor_set = load_split(data_config, split=args.noise_floor_split, source=source, channels=channels)
        floor_set = subset(floor_set, floor_row_indices(len(floor_set), min(args.num_images, len(floor_set)), args.seed))
        if len(reference) <= NEIGHBOURHOOD or len(floor_set) < 2:
            raise UserError(f"{args.dataset} has {len(reference)} images in [{args.split}] and {len(floor_set)} in "
                            f"[{args.noise_floor_split}]; evaluation needs at least {NEIGHBOURHOOD + 1} and 2: pass "
                            "--split and --noise-floor-split with larger splits")
    prompts = None
    if pipeline.text_conditioned:
        prompts = reference_prompts(reference, args.num_images, f"{args.dataset} [{args.split}]",
                                    args.strict_captions)
    started = time.perf_counter()
    num_workers = resolve_num_workers(args.num_workers)
    problems: list[str] = []

    def real_features(dataset, rows: range) -> torch.Tensor:
        parts = []
        for batch in sequential_batches(dataset, rows, args.batch_size, num_workers):
            problems.extend(batch.problems)
            parts.append(features_of(network, batch.images(pipeline.device)))
        return torch.cat(parts)

    reference_features = real_features(reference, range(len(reference)))
    generated, predictions, images_uint8 = [], [], []
    checks_captions = prompts is not None and args.dataset == SHAPES  # the shapes checker reads each sample
    for images, _ in pipeline.iter_generate(args.num_images, labels=all_labels, seed=args.seed, prompt=prompts,
                                            batch_size=args.batch_size, progress=args.progress, samplers=samplers):
        batch = images.mul(2).sub(1).to(pipeline.device)  # (b, C, H, W) [0, 1] -> [-1, 1]
        generated.append(features_of(network, batch))
        if isinstance(network, FeatureNetwork):
            with torch.no_grad():
                predictions.append(network(batch).argmax(1).cpu())
        if args.npz is not None or checks_captions:
            images_uint8.append(images.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).expand(-1, -1, -1, 3))
    generated_features = torch.cat(generated)
    prc = prc_features_to_metric(generated_features.float(), reference_features.float(),
                                 prc_neighborhood=NEIGHBOURHOOD, prc_batch_size=10000, save_cpu_ram=False,
                                 verbose=False)
    result = {"pipeline": str(args.pipeline), "dataset": args.dataset, "split": args.split,
              "fid": frechet_distance(generated_features, reference_features),
              "precision": prc[torch_fidelity.KEY_METRIC_PRECISION], "recall": prc[torch_fidelity.KEY_METRIC_RECALL],
              "num_images": args.num_images, "num_reference_images": len(reference_features)}
    floor = real_features(floor_set, range(len(floor_set)))  # real images disjoint from the reference, as many as the samples
    result.update(noise_floor_fid=frechet_distance(floor, reference_features), noise_floor_split=args.noise_floor_split,
                  noise_floor_images=len(floor_set))
    if predictions and all_labels is not None and network.config.num_classes == pipeline.num_classes:
        result["class_accuracy"] = float((torch.cat(predictions) == all_labels).double().mean())
    if checks_captions:
        result["caption_accuracy"] = caption_accuracy(torch.cat(images_uint8).numpy(), prompts)
    if args.npz is not None:
        Path(args.npz).parent.mkdir(parents=True, exist_ok=True)
        temporary = f"{args.npz}.tmp-{os.getpid()}.npz"
        np.savez(temporary, arr_0=torch.cat(images_uint8).numpy())
        os.replace(temporary, args.npz)
        result["npz"] = str(args.npz)
    result.update(corrupt_images=len(problems), seconds=time.perf_counter() - started,
                  protocol={"features": description, "reference": {"dataset": args.dataset, "split": args.split,
                                                                   "count": len(reference_features),
                                                                   "image_size": data_config.image_size},
                            "samples": args.num_images, "seed": args.seed,
                            "labels": None if all_labels is None else (args.labels or "drawn from the seed"),
                            "prompts": None if prompts is None else "the reference's captions, in row order, "
                                                                    f"{len(set(prompts))} distinct",
                            "sampling": {name: value for name, value in options.items()},
                            "tokenizer_sha256": tokenizer.weights_sha256(),
                            "prior_sha256": [member.weights_sha256() for member in pipeline.priors],
                            "precision_recall_k": NEIGHBOURHOOD, "torch_fidelity": torch_fidelity.__version__})
    if args.output is not None:
        write_json_atomic(args.output, result)
    print(f"FID {result['fid']:.3f} (noise floor {result['noise_floor_fid']:.3f}: {len(floor_set)} real images of "
          f"{args.noise_floor_split} against the {len(reference_features)} of the reference), precision "
          f"{result['precision']:.3f}, recall {result['recall']:.3f}", file=sys.stderr)
    print(json.dumps(result))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
