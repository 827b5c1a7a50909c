"""What a prior is conditioned on, one interface for every arch.

- `Context`: a batch of samples' conditions as the user gave them, checked once at the entry point
  (`Prior.sample`, `Pipeline.generate`, ...) and passed down whole: class labels (with the null class
  of classifier-free guidance), an aligned code map (a coarser tokenizer level), a caption as token ids
  (with the null caption of guidance; `stage2_prior.text`).
- `Conditioning`: what a network reads: the label rows of its class tables, the code map's features on
  the prior's grid (`ConditionNetwork`, location-dependent conditioning, Gated PixelCNN paper sec. 2.3),
  and the encoded caption its cross-attention reads.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from shared.errors import UserError
from stage2_prior.pretrained_text import encode_with
from stage2_prior.text import TextMemory, encode_captions


Prompt = str | list[str] | torch.Tensor | None  # one caption for every sample, one per sample, or token ids


@dataclasses.dataclass(frozen=True)
class Context:
    """The checked conditions of a batch: labels (B,) int64 or None; code_map (B, hc, wc[, Dc]) int or None;
    text (B, L) int64 caption token ids or None."""

    labels: torch.Tensor | None = None
    code_map: torch.Tensor | None = None
    text: torch.Tensor | None = None

    def values(self) -> tuple[torch.Tensor | None, ...]:
        return self.labels, self.code_map, self.text

    @property
    def batch_size(self) -> int | None:
        """The rows of the batch, or None for an unconditional batch (which has no tensor to count)."""
        return next((len(value) for value in self.values() if value is not None), None)

    def select(self, index: torch.Tensor | slice) -> "Context":
        """Rows `index` of the batch (a reorder, a subset, or one sample)."""
        return Context(*(None if value is None else value[index] for value in self.values()))

    def repeat_interleave(self, count: int) -> "Context":
        return Context(*(None if value is None else value.repeat_interleave(count, dim=0) for value in self.values()))

    def guided(self, config) -> "Context":
        """The batch twice: as it is, then unconditioned (classifier-free guidance's two branches): the null
        class for the labels and the null caption for the text, where the prior has them."""
        labels, code_map, text = self.values()
        if labels is not None:
            dropped = labels if config.null_class is None else torch.full_like(labels, config.null_class)
            labels = torch.cat([labels, dropped])
        if text is not None:
            dropped = text if not config.caption_dropout else null_prompts(config, len(text), text.device)
            text = torch.cat([text, dropped])
        return Context(labels, None if code_map is None else torch.cat([code_map, code_map]), text)


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """What a network reads besides the codes: labels (B,) (rows of its class tables, the null class
    included) or None; code_map (B, C, h', w): the condition map's features on the rows computed, or None;
    text: the encoded caption (`TextMemory`, text encoder "transformer") or None; text_ids (B, L): the caption's
    token ids (the null caption where dropped) or None."""

    labels: torch.Tensor | None = None
    code_map: torch.Tensor | None = None
    text: TextMemory | None = None
    text_ids: torch.Tensor | None = None

    def select(self, rows: torch.Tensor) -> "Conditioning":
        """The conditioning of rows `rows` of the batch (a decoder that drops finished samples computes it once)."""
        return Conditioning(*(None if value is None else value.select(rows) if isinstance(value, TextMemory)
                              else value[rows] for value in (self.labels, self.code_map, self.text, self.text_ids)))


def check_labels(config, labels: torch.Tensor | int | None, batch_size: int,
                 device: torch.device) -> torch.Tensor | None:
    """Labels as a (batch_size,) int64 tensor on `device` (an int is repeated); None for unconditional priors."""
    num_classes = config.num_classes
    if num_classes is None:
        if labels is not None:
            raise UserError("this prior is unconditional: pass labels=None (train with labelled codes "
                            "for a class-conditional prior)")
        return None
    if labels is None:
        raise UserError(f"this prior is class-conditional: pass labels in [0, {num_classes})")
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    if labels.ndim == 0:
        labels = labels.expand(batch_size)
    if labels.shape != (batch_size,):
        raise UserError(f"labels must be an int or {batch_size} ints, got shape {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise UserError(f"labels must lie in [0, {num_classes}), got values in "
                        f"[{int(labels.min())}, {int(labels.max())}]")
    return labels


def check_code_map(config, code_map: torch.Tensor | None, batch_size: int, device: torch.device) -> torch.Tensor | None:
    """The conditioning code map (batch_size, hc, wc[, Dc]) on `device`; None for a prior without one."""
    shape = config.condition_grid
    if shape is None:
        if code_map is not None:
            raise UserError("this prior takes no condition code map: pass condition=None")
        return None
    if code_map is None:
        raise UserError(f"this prior is conditioned on a code map: pass condition of shape "
                        f"({batch_size}, {', '.join(map(str, shape))})")
    code_map = torch.as_tensor(code_map, device=device)
    if code_map.dtype.is_floating_point or tuple(code_map.shape) != (batch_size, *shape):
        raise UserError(f"the condition code map must be integers of shape ({batch_size}, "
                        f"{', '.join(map(str, shape))}), got {code_map.dtype} {tuple(code_map.shape)}")
    if code_map.numel() and (int(code_map.min()) < 0 or int(code_map.max()) >= config.condition_vocab_size):
        raise UserError(f"the condition codes must lie in [0, {config.condition_vocab_size}), got values in "
                        f"[{int(code_map.min())}, {int(code_map.max())}]")
    return code_map


def check_prompt(config, prompt: str | list[str] | torch.Tensor | None, batch_size: int,
                 device: torch.device) -> torch.Tensor | None:
    """A prompt (one str for every sample, or one per sample; or token ids (B, L)) as token ids (batch_size,
    text_length) on `device`; None for a prior without text conditioning."""
    if config.text_encoder is None:
        if prompt is not None:
            raise UserError("this prior has no text conditioning: drop the prompt (prompt=, --prompt, --prompts-file); "
                            "train on captioned codes for a text-conditioned prior")
        return None
    if prompt is None:
        raise UserError("this prior is text-conditioned: pass a prompt (prompt= one string or one per sample; "
                        "--prompt or --prompts-file on the command line)")
    if isinstance(prompt, torch.Tensor):
        if (prompt.shape != (batch_size, config.text_length) or prompt.dtype.is_floating_point
                or prompt.dtype == torch.bool):
            raise UserError(f"prompt token ids must be integers of shape ({batch_size}, {config.text_length}), got "
                            f"{prompt.dtype} {tuple(prompt.shape)}")
        low, high = (-1, None) if config.text_encoder_path is not None else (0, config.text_vocab_size)
        if prompt.numel() and (int(prompt.min()) < low or (high is not None and int(prompt.max()) >= high)):
            raise UserError(f"prompt token ids must lie in [{low}, {high if high is not None else 'the vocabulary'}), "
                            f"got values in [{int(prompt.min())}, {int(prompt.max())}]; pass the prompts as text")
        return prompt.long().to(device)
    if not isinstance(prompt, (str, list, tuple)):
        raise UserError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
    prompts = [prompt] * batch_size if isinstance(prompt, str) else list(prompt)
    if len(prompts) != batch_size or not all(isinstance(text, str) for text in prompts):
        raise UserError(f"prompt must be one string or {batch_size} strings, got {len(prompts)} "
                        f"{'values' if not all(isinstance(text, str) for text in prompts) else 'strings'}")
    if any(not text.strip() for text in prompts):
        raise UserError("a prompt is empty: give every sample some text")
    return encode_prompts(config, prompts).to(device)


def encode_prompts(config, captions: list[str | None], warn_truncated: bool = True) -> torch.Tensor:
    """Captions -> token ids (B, text_length) by the prior's tokenizer (its own BPE, or a pretrained encoder's);
    a None caption is the null caption."""
    if config.text_encoder_path is not None:
        return encode_with(config.text_encoder_path, captions, config.text_length, warn_truncated)
    return encode_captions(config.text_tokenizer, captions, config.text_length, warn_truncated)


def null_prompts(config, count: int, device: torch.device) -> torch.Tensor:
    """The null caption of classifier-free guidance, `count` times: (count, text_length) int64."""
    return encode_prompts(config, [None], warn_truncated=False).to(device).expand(count, -1)


def check_context(config, labels, condition, batch_size: int, device: torch.device, prompt=None) -> Context:
    """The checked Context of a batch of `batch_size` samples."""
    return Context(check_labels(config, labels, batch_size, device),
                   check_code_map(config, condition, batch_size, device),
                   check_prompt(config, prompt, batch_size, device))


def label_rows(config) -> int:
    """Rows of the class embedding tables: the classes, and the null class when there is one."""
    return (config.num_classes or 0) + (config.null_class is not None)


def dropped_labels(config, labels: torch.Tensor | None, training: bool) -> torch.Tensor | None:
    """Labels as the network sees them: in training with label dropout, some become the null class."""
    null = config.null_class
    if labels is None or null is None or not training:
        return labels
    drop = torch.rand(labels.shape, device=labels.device) < config.label_dropout
    return torch.where(drop, torch.full_like(labels, null), labels)


def dropped_text(config, text: torch.Tensor | None, training: bool) -> torch.Tensor | None:
    """Caption ids as the network sees them: in training with caption dropout, some become the null caption."""
    if text is None or not config.caption_dropout or not training:
        return text
    drop = torch.rand(len(text), device=text.device) < config.caption_dropout  # (B,)
    return torch.where(drop[:, None], null_prompts(config, len(text), text.device), text)


class ConditionNetwork(nn.Module):
    """A coarser code grid (B, hc, wc[, Dc]) -> features (B, C, h, w) on the prior's grid.

    Embedded codes go through residual 3x3 convolutions at their own resolution, are upsampled by
    the integer factor between the grids (nearest), and mixed by one more 3x3 convolution. The map
    is known in full before sampling starts, so it needs no causal mask.
    """

    def __init__(self, vocab_size: int, condition_shape: tuple[int, ...], target_shape: tuple[int, int],
                 channels: int) -> None:
        super().__init__()
        self.depth = condition_shape[2] if len(condition_shape) == 3 else 1
        self.vocab_size = vocab_size
        self.scale = (target_shape[0] // condition_shape[0], target_shape[1] // condition_shape[1])
        self.embedding = nn.Embedding(vocab_size * self.depth, channels)
        self.blocks = nn.ModuleList(nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                                  nn.Conv2d(channels, channels, 1)) for _ in range(2))
        self.out = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        stacked = condition.long().reshape(*condition.shape[:3], self.depth)  # (B, hc, wc, Dc)
        offsets = torch.arange(self.depth, device=condition.device) * self.vocab_size
        x = self.embedding(stacked + offsets).sum(3).permute(0, 3, 1, 2)  # (B, C, hc, wc)
        for block in self.blocks:
            x = x + block(x)
        if self.scale != (1, 1):
            x = F.interpolate(x, scale_factor=self.scale, mode="nearest")  # (B, C, h, w)
        return self.out(F.relu(x))
