"""Self-describing model folders: `config.json` (architecture) + `model.safetensors` (weights).

`from_pretrained(dir)` needs nothing but the folder. Writes are crash-safe: a new folder is built
under a temporary name and renamed; an existing folder (a training output) gets each file replaced
atomically, weights first, so a reader never sees a config that points at missing weights.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save, save_file

from shared.config import config_from_dict, config_to_dict, read_json, write_json_atomic
from shared.errors import UserError
from shared.files import CONFIG_NAME, WEIGHTS_NAME, fsync_file
from shared.hub import push_folder, resolve_folder

FORMAT_VERSION = 1

ModelT = TypeVar("ModelT", bound="PretrainedModel")


class PretrainedModel(torch.nn.Module):
    """Base class for models built from one frozen config dataclass and saved as a pretrained folder.

    A class whose saved form changes raises `format_version` and says how to read the older forms in
    `upgrade_config` and `upgrade_weights`, so every folder an earlier release wrote keeps loading."""

    config_class: ClassVar[type]
    format_version: ClassVar[int] = FORMAT_VERSION

    @classmethod
    def upgrade_config(cls, values: dict[str, Any], version: int, source: str) -> dict[str, Any]:
        """config.json values written with format `version` (older than `format_version`) as the current
        format has them. The base class knows no older format."""
        raise UserError(f"{source} has format_version {version}, this vqprior reads {cls.format_version}")

    @classmethod
    def upgrade_weights(cls, weights: dict[str, torch.Tensor], version: int) -> dict[str, torch.Tensor]:
        """Weights saved with format `version` under the current names (the base class renames nothing)."""
        return weights

    @classmethod
    def resolve_config(cls, config: Any, directory: Path) -> Any:
        """The config of a folder as the model is built from it: paths it holds relative to `directory` made
        absolute (the base class's configs hold none)."""
        return config

    def __init__(self, config: Any) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    def save_pretrained(self, directory: str | os.PathLike, push_to_hub: bool = False, repo_id: str | None = None,
                        **hub_options: Any) -> Path:
        """Write `config.json` + `model.safetensors` (and the model's own parts) into `directory` (created if
        needed); with `push_to_hub`, then upload the folder and a model card to the Hub repo `repo_id`
        (`hub_options`: revision, private, token; see `shared.hub.push_folder`)."""
        if push_to_hub and not repo_id:
            raise UserError("push_to_hub=True needs repo_id='your-name/model-name'")
        saved = self.write_folder(Path(directory))
        if push_to_hub:
            push_folder(saved, repo_id, **hub_options)
        return saved

    def write_folder(self, directory: Path) -> Path:
        """Write the folder `save_pretrained` saves (a subclass with parts of its own adds them here)."""
        config_values = {"_class_name": type(self).__name__, "format_version": self.format_version,
                         **config_to_dict(self.config)}
        weights = self.weights_for_saving()
        if directory.exists():
            write_weights_atomic(directory / WEIGHTS_NAME, weights)
            write_json_atomic(directory / CONFIG_NAME, config_values)
            return directory
        with staged_folder(directory) as staging:
            write_weights_atomic(staging / WEIGHTS_NAME, weights)
            write_json_atomic(staging / CONFIG_NAME, config_values)
        return directory

    def weights_for_saving(self) -> dict[str, torch.Tensor]:
        # clone: safetensors refuses tensors that share storage, and contiguous copies are cheap here.
        return {name: tensor.detach().cpu().contiguous().clone() for name, tensor in self.state_dict().items()}

    def weights_sha256(self) -> str:
        """sha256 of the model.safetensors that save_pretrained writes for these weights (provenance)."""
        return hashlib.sha256(save(self.weights_for_saving(), metadata={"format": "pt"})).hexdigest()

    @classmethod
    def from_pretrained(cls: type[ModelT], directory: str | os.PathLike, map_location: str | torch.device = "cpu",
                        revision: str | None = None) -> ModelT:
        """Rebuild a model from a folder written by `save_pretrained`, in eval mode: a local folder, or a Hub
        repo id ("org/name", at `revision`) downloaded through the Hub cache."""
        directory = resolve_folder(directory, revision)
        config, version = load_pretrained_config(cls, directory)
        model = cls(cls.resolve_config(config, Path(directory)))
        weights = load_weights(Path(directory) / WEIGHTS_NAME, map_location)
        if version != cls.format_version:
            weights = cls.upgrade_weights(weights, version)
        try:
            missing, unexpected = model.load_state_dict(weights, strict=False)
        except RuntimeError as error:  # a tensor of another shape: the files disagree
            detail = str(error).split("\n\t")[1] if "\n\t" in str(error) else str(error).splitlines()[0]
            raise UserError(f"{Path(directory) / WEIGHTS_NAME} does not match {Path(directory) / CONFIG_NAME} "
                            f"({detail.strip()}); restore the folder or re-save the model") from None
        if missing or unexpected:
            problem = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
            raise UserError(f"{Path(directory) / WEIGHTS_NAME} does not match its config.json ({problem}); "
                            "re-save the model with this version of vqprior")
        return model.eval()


@contextlib.contextmanager
def staged_folder(directory: Path) -> Iterator[Path]:
    """Build a new folder under a temporary name beside `directory`; rename it into place only when
    the block succeeds, so `directory` never exists half-written."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        yield staging
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load_pretrained_config(cls: type[PretrainedModel], directory: str | os.PathLike) -> tuple[Any, int]:
    """Read and check `config.json` of a pretrained folder for model class `cls`: (its config, the format
    version it was written with; an older one is upgraded by `cls.upgrade_config`)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory} is not a folder; pass a folder written by save_pretrained or a training run")
    config_path = directory / CONFIG_NAME
    if not config_path.is_file() or not (directory / WEIGHTS_NAME).is_file():
        missing = CONFIG_NAME if not config_path.is_file() else WEIGHTS_NAME
        raise UserError(f"{directory} is not a pretrained {cls.__name__} folder: {missing} is missing; "
                        "pass the output folder of a finished training run")
    values = read_json(config_path)
    class_name = values.pop("_class_name", None)
    version = values.pop("format_version", None)
    if class_name != cls.__name__:
        raise UserError(f"{directory} holds a {class_name or 'unknown model'}, not a {cls.__name__}; "
                        "pass the right folder")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= cls.format_version:
        raise UserError(f"{config_path} has format_version {version}, this vqprior reads 1 to {cls.format_version}; "
                        "was it written by a newer vqprior?")
    if version != cls.format_version:
        values = cls.upgrade_config(values, version, str(config_path))
    return config_from_dict(cls.config_class, values, source=str(config_path)), version


def write_weights_atomic(path: Path, weights: dict[str, torch.Tensor]) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(weights, str(temporary), metadata={"format": "pt"})
    fsync_file(temporary)
    os.replace(temporary, path)


def load_weights(path: Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file, with a one-line error naming the file when it is truncated or corrupt."""
    try:
        return load_file(str(path), device=str(map_location))
    except FileNotFoundError:
        raise UserError(f"{path} is missing") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise UserError(f"{path} is corrupt or truncated ({str(error).splitlines()[0]}); "
                        "restore it from a checkpoint or re-run training") from None
