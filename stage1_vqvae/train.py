"""Train the VQ-VAE tokenizer: `python -m stage1_vqvae.train --output-dir runs/tokenizer`.

Also runs under `accelerate launch -m stage1_vqvae.train ...` and `torchrun --nproc_per_node N -m ...`.
When it ends, --output-dir loads with `VQVAE.from_pretrained(output_dir)`.

With --discriminator-weight > 0 it trains VQGAN's way (Esser et al. 2021, sec. 3.1): from step
--discriminator-start on, a PatchGAN discriminator learns to tell images from reconstructions (hinge
loss) and the tokenizer's loss gains weight * adaptive weight * -mean(D(reconstruction)). The
discriminator and its optimizer are in every checkpoint (model_1.safetensors, optimizer_1.bin), so
exact resume holds with it.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from shared.config import build_parser, config_from_args, parse_args, values_from_args
from shared.data import (Augmentation, CachedImages, StepOrder, first_image_channels, load_train_and_validation,
                         open_source, resolve_num_workers, save_image_grid, sequential_batches, should_cache,
                         training_batches)
from shared.data.streaming import Stream
from shared.errors import run_cli
from shared.runtime import local_process_count
from shared.training import TrainingSession, check_output_dir, run_settings
from stage1_vqvae.config import Stage1TrainConfig, VQVAEConfig, best_metric_of
from stage1_vqvae.discriminator import PatchDiscriminator
from stage1_vqvae.losses import (PerceptualLoss, adaptive_weight, discriminator_hinge_loss, generator_adversarial_loss,
                                 reconstruction_loss)
from stage1_vqvae.metrics import reconstruction_metrics
from stage1_vqvae.model import VQVAE

# Fields of VQVAEConfig that come from the data, not from their own flags.
DATA_DERIVED = frozenset({"in_channels", "image_size"})
# --preset: flag values that fill in what the command line leaves out (docs/benchmarks.md says how
# each recipe was chosen; the flags given explicitly always win).
PRESETS = {
    # best held-out PSNR per CPU second on scikit-image's photographs among the recipes with >= 1,024 codes
    # (benchmarks/natural_photos.py); the VQGAN network was 7 dB behind at ten CPU minutes
    "photos": dict(arch="vqvae", codebook_size=1024, codebook_dim=8, use_cosine_sim=True),
}
DISCRIMINATOR_SEED_OFFSET = 0xD15C  # the discriminator's initial weights come from seed + this


def parser():
    # image_size is a data flag (declared first, so VQVAEConfig's duplicate gets none); in_channels comes from the data
    return build_parser("Train the VQ-VAE tokenizer (stage 1).", Stage1TrainConfig, VQVAEConfig,
                        skip=frozenset({"in_channels"}))


def apply_preset(args):
    """Fill in the --preset's values for the flags the command line left out (explicit flags win)."""
    for name, value in PRESETS.get(getattr(args, "preset", "none"), {}).items():
        if not hasattr(args, name):  # absent flags are absent from the namespace
            setattr(args, name, value)
    return args


def train(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Parse flags, train, save; returns the final validation metrics."""
    args = apply_preset(parse_args(parser(), argv))
    train_config = config_from_args(Stage1TrainConfig, args)
    # Every check that can refuse the run comes before the dataset is listed or decoded: flags, the
    # output folder, the first image, the model config and the --resume settings. Nothing is written yet.
    train_config.check()
    train_config.check_data_flags()
    check_output_dir(train_config)
    stream = Stream(train_config, train_config) if train_config.streaming else None
    source = open_source(train_config) if stream is None else None
    channels = (first_image_channels(source, train_config.split, train_config.channels) if stream is None
                else stream.first_channels(train_config.channels))
    model_values = values_from_args(VQVAEConfig, args, exclude=DATA_DERIVED)
    model_config = VQVAEConfig(in_channels=channels, image_size=train_config.image_size, **model_values)
    perceptual = PerceptualLoss(train_config.perceptual_net) if train_config.perceptual_weight > 0 else None
    monitor, higher_is_better = best_metric_of(train_config)
    session = TrainingSession(train_config, run_settings(train_config, model_config), "vqvae", monitor=monitor,
                              out_of_memory_advice="lower --batch-size or --image-size, or use "
                                                   "--gradient-accumulation-steps to keep the effective batch",
                              higher_is_better=higher_is_better)
    accelerator = session.accelerator

    augmentation = Augmentation(train_config.seed, train_config.random_flip, train_config.random_crop)
    if stream is None:
        train_set, validation_set = load_train_and_validation(train_config, source, channels, augmentation)
    else:  # the training split is never listed; validation reads the held-out split's first examples
        train_set, validation_set = None, stream.validation_set(channels)
    num_workers = resolve_num_workers(train_config.num_workers, local_process_count())
    show = session.is_main and train_config.progress
    train_data = (CachedImages(train_set, num_workers, progress=show)
                  if train_set is not None and should_cache(train_set, train_config.cache_images) else train_set)
    validation_data = (CachedImages(validation_set, num_workers, progress=show)
                       if should_cache(validation_set, train_config.cache_images) else validation_set)
    for data in (train_data, validation_data):
        session.report_problems(getattr(data, "problems", []))

    model, _ = session.prepare(VQVAE(model_config))  # after Accelerator(): the codebook syncs across processes
    adversarial = train_config.discriminator_weight > 0
    if adversarial:
        # After the tokenizer, from its own seed: the tokenizer's weights and its RNG stream (k-means
        # initialisation, dead-code replacement) are those of the same run without a discriminator.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(train_config.seed + DISCRIMINATOR_SEED_OFFSET)
            built = PatchDiscriminator(channels, train_config.discriminator_layers)
        discriminator, discriminator_optimizer = session.prepare_auxiliary(
            built, train_config.discriminator_learning_rate or train_config.learning_rate)
        # the unwrapped modules: DDP wrappers have no .decoder, and the tokenizer step calls the
        # discriminator frozen, outside DDP, since it computes no discriminator gradients
        discriminator_module = accelerator.unwrap_model(discriminator)
    if perceptual is not None:
        perceptual.to(session.device)
    start_step = session.restore()
    first_micro_batch = start_step * train_config.gradient_accumulation_steps
    if stream is None:
        order = StepOrder(len(train_set), train_config.batch_size, train_config.seed, accelerator.process_index,
                          accelerator.num_processes)
        batches = training_batches(train_data, order, first_micro_batch, num_workers,
                                   pin_memory=session.device.type == "cuda")
    else:
        batches = stream.training_batches(channels, augmentation, train_config.batch_size, accelerator.process_index,
                                          accelerator.num_processes, first_micro_batch, num_workers,
                                          pin_memory=session.device.type == "cuda")

    last_batch: dict[str, torch.Tensor] = {}  # the step's last micro-batch, for the discriminator

    def compute_loss(micro_batch: int) -> tuple[torch.Tensor, dict[str, float]]:
        batch = next(batches)
        session.report_problems(batch.problems)
        images = batch.images(session.device)  # (B, C, H, W) in [-1, 1]
        output = model(images)
        loss = reconstruction_loss(train_config.reconstruction_loss, output.reconstruction, images)
        if perceptual is not None:
            loss = loss + train_config.perceptual_weight * perceptual(output.reconstruction, images)
        logs: dict[str, float] = {}  # codebook usage is measured over the whole validation split, never per batch
        step = micro_batch // train_config.gradient_accumulation_steps
        if adversarial and step >= train_config.discriminator_start:
            last_batch.update(real=images, fake=output.reconstruction.detach())
            # The tokenizer's step leaves the discriminator alone. (With --fsdp its gradients are computed and
            # dropped before its own step instead: FSDP's gathered weights keep requires_grad from their first use.)
            discriminator_module.requires_grad_(train_config.fsdp)
            try:
                adversarial_loss = generator_adversarial_loss(discriminator_module(output.reconstruction))
            finally:
                discriminator_module.requires_grad_(True)
            # read after the forward: with --fsdp the attribute is the gathered weight the forward used
            weight = adaptive_weight(loss, adversarial_loss, session.unwrapped_model.decoder.conv_out.weight)
            loss = loss + train_config.discriminator_weight * weight * adversarial_loss
            logs.update(g_adv=adversarial_loss.item(), adaptive_weight=weight.item())
        return loss + output.quantizer_loss, logs

    def discriminator_step(step: int) -> dict[str, float]:
        """One update of the discriminator on the step's last micro-batch: its real images and
        (detached) reconstructions, in one forward (GroupNorm keeps the images apart)."""
        discriminator_optimizer.zero_grad(set_to_none=True)  # with --fsdp: what the tokenizer's step left
        if step < train_config.discriminator_start:
            return {}
        real, fake = last_batch.pop("real"), last_batch.pop("fake")
        logits = discriminator(torch.cat([real, fake]))  # (2B, 1, s, s)
        loss = discriminator_hinge_loss(logits[:len(real)], logits[len(real):])
        accelerator.backward(loss)
        discriminator_optimizer.step()
        discriminator_optimizer.zero_grad(set_to_none=True)
        return {"d_loss": loss.item()}

    def evaluate(step: int) -> dict[str, float]:
        return reconstruction_metrics(session.unwrapped_model, validation_data, 256, session.device,
                                      accelerator.process_index, accelerator.num_processes,
                                      reduce_sum=lambda t: accelerator.reduce(t, reduction="sum"),
                                      num_workers=num_workers, report_problems=session.report_problems,
                                      perceptual=perceptual if monitor == "lpips" else None)

    def save_reconstructions(step: int) -> None:
        if not (session.is_main and session.due(step, train_config.eval_every)):
            return
        per_row = min(8, len(validation_set))  # rows of originals, each followed by its reconstructions
        count = min(32, len(validation_set)) // per_row * per_row
        originals = next(sequential_batches(validation_data, range(count), count, 0)).images("cpu")
        with torch.no_grad():
            unwrapped = session.unwrapped_model.eval()
            reconstructions = unwrapped(originals.to(session.device)).reconstruction.cpu()
        row_shape = (-1, per_row, *originals.shape[1:])
        rows = torch.stack([originals.view(row_shape), reconstructions.view(row_shape)], 1)
        save_image_grid(rows.flatten(0, 2), session.output_dir / "samples" / f"reconstructions_{step:08d}.png",
                        nrow=per_row)

    metrics = session.run(start_step, compute_loss, evaluate, after_step=save_reconstructions,
                          auxiliary_step=discriminator_step if adversarial else None)
    return session.finish_run(metrics)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(train, argv)


if __name__ == "__main__":
    sys.exit(main())
