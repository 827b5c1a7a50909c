"""A frozen pretrained text encoder from a local `transformers` folder (T5 or CLIP text models, as Parti and
Imagen read T5; Saharia et al. 2022, sec. 2.1), its hidden states projected to the prior's width and read by
the same cross-attention as the trained encoder (`stage2_prior.text`).

Nothing is downloaded: `--text-encoder-path FOLDER` names a folder written by `save_pretrained` (the model's
config.json and weights, and its tokenizer's files). The prior keeps a copy of that folder in its own folder
(`text_encoder/`), so a saved prior is self-contained; the encoder's weights stay out of model.safetensors and
its sha256 is recorded in the prior's config. Token ids in a Context use -1 for padding (the tokenizer's own
pad id may be a real token, as CLIP's is); the null caption of guidance is the tokenizer's encoding of "".
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.errors import UserError, first_line
from shared.files import file_sha256
from shared.hub import contained
from stage2_prior.text import TextMemory

# The encoder classes read, by the model type of a folder's config.json (a full T5 folder gives its encoder)
ENCODER_CLASSES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel",
                   "clip_text_model": "CLIPTextModel", "clip": "CLIPTextModel", "siglip_text_model": "SiglipTextModel",
                   "bert": "BertModel"}
# one file, or the index of a sharded checkpoint (save_pretrained shards anything over 5 GB: T5-XL, T5-XXL)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
ENCODER_FOLDER = "text_encoder"  # its copy inside a prior's folder


def _transformers():
    # imported when a pretrained encoder is used: importing transformers costs seconds every other command saves
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def check_encoder_folder(path: str | Path) -> str:
    """The encoder class of a local transformers folder; a one-line error when it is not a text model's."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"--text-encoder-path {path} is not a transformers model folder (no config.json); pass a "
                        "folder written by save_pretrained of a T5 or CLIP text model")
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as error:  # transformers raises several types for a bad config.json
        raise UserError(f"--text-encoder-path {path}: cannot read its config.json ({first_line(error)})") from None
    model_type = getattr(config, "model_type", None)
    if model_type not in ENCODER_CLASSES:
        raise UserError(f"--text-encoder-path {path} holds a {model_type!r} model, not a text encoder this prior reads "
                        f"({', '.join(sorted(set(ENCODER_CLASSES)))}); pass a T5 or CLIP text model's folder")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise UserError(f"--text-encoder-path {path} has no weights ({' or '.join(WEIGHT_FILES)}); save the model "
                        "with save_pretrained")
    return ENCODER_CLASSES[model_type]


def encoder_sha256(path: str | Path) -> str:
    """One sha256 over every file of the folder (weights, config, tokenizer), by name and content."""
    digest = hashlib.sha256()
    for file in sorted(file for file in Path(path).iterdir() if file.is_file()):
        digest.update(file.name.encode() + b"\0" + file_sha256(file).encode())
    return digest.hexdigest()


@functools.lru_cache(maxsize=4)
def load_text_tokenizer(path: str) -> Any:
    try:
        return _transformers().AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as error:  # a folder without tokenizer files
        raise UserError(f"the text encoder folder {path} has no usable tokenizer ({first_line(error)}); save the "
                        "encoder's tokenizer into it with save_pretrained") from None


def encode_with(path: str, captions: list[str | None], length: int, warn_truncated: bool = True) -> torch.Tensor:
    """Captions -> token ids (B, length) of the encoder's tokenizer, -1 where padded; None: the null caption ("")."""
    tokenizer = load_text_tokenizer(path)
    texts = [caption or "" for caption in captions]
    full = tokenizer(texts, add_special_tokens=True)["input_ids"]
    cut = [row for row, ids in enumerate(full) if len(ids) > length]
    if cut and warn_truncated:
        print(f"warning: {len(cut)} caption(s) are longer than the prior's {length} text tokens and were cut to it "
              f"(e.g. {texts[cut[0]]!r})", file=sys.stderr)
    ids = torch.full((len(texts), length), -1, dtype=torch.long)
    # a caption must keep a visible token (cross-attention over none is undefined): a tokenizer that adds no
    # special tokens encodes the null caption "" as nothing, which becomes its end (or padding) token
    fallback = next((value for value in (tokenizer.eos_token_id, tokenizer.pad_token_id) if value is not None), 0)
    for row, tokens in enumerate(full):
        tokens = tokens[:length] or [fallback]
        ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return ids


class PretrainedTextEncoder(nn.Module):
    """Token ids (B, L) (-1: padding) -> TextMemory: the frozen encoder's last hidden states, projected to
    `channels` and normalised (the projection is trained with the prior)."""

    def __init__(self, path: str | Path, channels: int, length: int) -> None:
        super().__init__()
        transformers = _transformers()
        encoder_class = getattr(transformers, check_encoder_folder(path))
        # kept out of the module tree: frozen, saved as its own folder, never in the prior's state dict; in
        # float32 whatever its folder was saved in (the prior's dtype follows with .to())
        self.__dict__["encoder"] = encoder_class.from_pretrained(str(path), local_files_only=True,
                                                                 dtype=torch.float32).float().eval()
        self.encoder.requires_grad_(False)
        config = self.encoder.config
        limit = getattr(config, "max_position_embeddings", None)
        if limit is not None and length > limit:
            raise UserError(f"--text-length {length} is longer than the text encoder in {path} reads ({limit} "
                            f"tokens); pass --text-length {limit} or less")
        width = getattr(config, "hidden_size", None) or getattr(config, "d_model")
        self.projection = nn.Linear(width, channels)
        self.norm = nn.LayerNorm(channels)

    def _apply(self, fn, recurse: bool = True):
        self.encoder._apply(fn)  # .to(device) and dtype casts reach the frozen encoder too
        return super()._apply(fn, recurse)

    def forward(self, ids: torch.Tensor) -> TextMemory:
        mask = ids >= 0  # (B, L)
        with torch.no_grad():
            states = self.encoder(input_ids=ids.clamp(min=0), attention_mask=mask.long()).last_hidden_state
        return TextMemory(self.norm(self.projection(states.to(self.projection.weight.dtype))), mask)


def resolve_encoder_path(config: Any, directory: Path) -> Any:
    """A saved prior's config with its pretrained encoder's folder (relative to the prior's folder) made absolute,
    after checking the encoder is the one it was trained with."""
    if config.text_encoder_path is None:
        return config
    path = contained(directory, config.text_encoder_path, "its text encoder").resolve()  # a self-contained folder
    check_encoder_folder(path)
    if config.text_encoder_sha256 is not None and encoder_sha256(path) != config.text_encoder_sha256:
        raise UserError(f"the text encoder in {path} is not the one this prior was trained with (sha256 differs); "
                        "restore the prior's folder")
    return dataclasses.replace(config, text_encoder_path=str(path))


def save_with_encoder(model: Any, directory: str | Path, save) -> Path:
    """`save(directory)` (config.json + model.safetensors) with the config naming the encoder's copy, then the
    pretrained encoder's folder copied beside them as text_encoder/ (its files, not its subfolders)."""
    config = model.config
    if config.text_encoder_path is None:
        return save(directory)
    source, destination = Path(config.text_encoder_path), Path(directory) / ENCODER_FOLDER
    model.config = dataclasses.replace(config, text_encoder_path=ENCODER_FOLDER)
    try:
        saved = save(directory)
    finally:
        model.config = config
    if destination.resolve() != source.resolve():
        staging = destination.with_name(f".{ENCODER_FOLDER}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for file in source.iterdir():
            if file.is_file():
                shutil.copy2(file, staging / file.name)
        shutil.rmtree(destination, ignore_errors=True)
        os.replace(staging, destination)
    return saved
