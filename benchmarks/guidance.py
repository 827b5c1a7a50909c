"""What classifier-free guidance does: the accuracy of a digit classifier on class-conditional samples.

    python benchmarks/guidance.py --tokenizer runs/tok --codes runs/codes --output-dir runs/guidance

Trains a class-conditional prior with label dropout (`--label-dropout 0.1`) on the codes (or takes
`--prior`), draws `--per-class` samples of every digit at each guidance scale, decodes them, and
classifies them with a logistic regression fitted on scikit-learn's 8x8 digits (images are reduced
to 8x8 and 17 grey levels the same way; its accuracy on real held-out digits through that path is
printed first, as the ceiling). Accuracy = fraction of samples the classifier reads as the digit
they were asked for.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def to_digit_features(images: torch.Tensor) -> np.ndarray:
    """Images (N, 1, S, S) in [0, 1] -> scikit-learn digits features (N, 64) in 0..16."""
    small = F.adaptive_avg_pool2d(images.float(), 8)  # (N, 1, 8, 8)
    return (small.flatten(1) * 16).round().numpy()


def fitted_classifier():
    from sklearn.linear_model import LogisticRegression

    from shared.data import DataConfig, load_split

    train = load_split(DataConfig(dataset="digits", image_size=32), "train")
    test = load_split(DataConfig(dataset="digits", image_size=32), "test")
    # fit on the training split through the same 32 -> 8 path the samples take
    features = to_digit_features(torch.stack([train[i][0] for i in range(len(train))]).add(1).div(2))
    classifier = LogisticRegression(max_iter=5000).fit(features, train.labels)
    test_features = to_digit_features(torch.stack([test[i][0] for i in range(len(test))]).add(1).div(2))
    ceiling = float((classifier.predict(test_features) == test.labels).mean())
    return classifier, ceiling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--codes", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--prior", default=None, help="a prior trained with --label-dropout (default: train one)")
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 3.0])
    parser.add_argument("--max-steps", type=int, default=1000)
    args = parser.parse_args()
    from pipelines import Pipeline
    from shared.data import save_image_grid
    from stage1_vqvae import load_tokenizer
    from stage2_prior import Prior
    from stage2_prior.train import train

    output = Path(args.output_dir)
    prior_dir = Path(args.prior) if args.prior else output / "prior"
    if args.prior is None and not (prior_dir / "model.safetensors").is_file():
        train(["--codes", args.codes, "--output-dir", str(prior_dir), "--label-dropout", "0.1", "--max-steps",
               str(args.max_steps), "--eval-every", str(args.max_steps // 4), "--no-progress", "--overwrite"])
    pipeline = Pipeline(load_tokenizer(args.tokenizer), Prior.from_pretrained(prior_dir))
    classifier, ceiling = fitted_classifier()
    print(f"classifier accuracy on real test digits: {ceiling:.3f}")
    labels = torch.arange(10).repeat_interleave(args.per_class)
    results = {"classifier_on_real_digits": ceiling}
    for scale in args.scales:
        out = pipeline.generate(len(labels), labels=labels.tolist(), seed=0, guidance_scale=scale, output_type="pt",
                                progress=False)
        accuracy = float((classifier.predict(to_digit_features(out.images)) == labels.numpy()).mean())
        results[f"accuracy_at_scale_{scale:g}"] = accuracy
        order = torch.arange(0, len(labels), args.per_class)[:, None] + torch.arange(8)  # 8 per digit
        save_image_grid(out.images[order.flatten()].mul(2).sub(1), output / f"samples_scale_{scale:g}.png", nrow=8)
        print(f"guidance scale {scale:g}: accuracy {accuracy:.3f}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
