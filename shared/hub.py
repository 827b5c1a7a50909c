"""Model folders shared through the Hugging Face Hub, with `huggingface_hub` doing every transfer.

- `resolve_folder("org/name", revision)`: a local folder as it is, or a Hub repo's snapshot (downloaded
  once into the Hub cache, read from there offline). Every `from_pretrained` goes through it.
- `push_folder(folder, "org/name")`: upload a tokenizer, prior or pipeline folder with a model card
  (`model_card`); what goes up is `upload_plan(folder)`: the model's own files, never a run's
  checkpoints, logs or samples.

A shared folder is self-contained: a component it names (a pipeline's parts, a prior's text encoder,
any config key ending in `_path`) is a relative path inside it (`contained`), so nothing it loads
reaches outside its own snapshot. Hashes are checked as for local folders (a prior names its
tokenizer's and its text encoder's sha256), and the card lists every weights file's sha256.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData, constants, get_token, snapshot_download
from huggingface_hub.errors import (GatedRepoError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                    RevisionNotFoundError)
from huggingface_hub.utils import validate_repo_id

from shared.errors import UploadFailed, UserError, first_line
from shared.files import CONFIG_NAME, WEIGHTS_NAME, file_sha256

MODEL_CARD_NAME = "README.md"
PIPELINE_NAME = "pipeline.json"
ENCODER_FOLDER = "text_encoder"  # a prior's copy of its pretrained text encoder
MODEL_FILES = (CONFIG_NAME, WEIGHTS_NAME, PIPELINE_NAME, "metrics.json", "train_config.json")  # what is uploaded
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name; a local path that exists wins
LOAD_SNIPPETS = {  # how a reader loads each kind of folder
    "pipeline": "from pipelines import Pipeline\npipe = Pipeline.from_pretrained({repo!r})\nimages = pipe.generate(16, seed=0).images",
    "prior": "from stage2_prior import Prior\nprior = Prior.from_pretrained({repo!r})",
    "tokenizer": "from stage1_vqvae.tokenizer import load_tokenizer\ntokenizer = load_tokenizer({repo!r})",
    "model": "model = {name}.from_pretrained({repo!r})  # the vqprior class its config.json names",
}


def resolve_folder(name: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder as it is; else a Hub repo id ("org/name") as its downloaded snapshot (from the Hub
    cache when offline). `revision`: a branch, tag or commit of the repo (not for local folders)."""
    path = Path(name)
    # a path that exists, or whose first folder does (runs/typo), is local; org/name is a repo id
    if path.exists() or Path(path.parts[0]).is_dir() or not REPO_ID.fullmatch(str(name)):
        if revision is not None:
            raise UserError(f"revision={revision!r} applies to Hub repos, and {name} is a local path; drop it")
        return path
    try:
        return Path(snapshot_download(str(name), revision=revision, library_name="vqprior"))
    except (RepositoryNotFoundError, GatedRepoError):
        raise UserError(f"{name} is neither a local folder nor a Hub repo you can read; check the path, or log in "
                        "(hf auth login) for a private repo") from None
    except RevisionNotFoundError:
        raise UserError(f"the Hub repo {name} has no revision {revision!r}; pass a branch, tag or commit it has") from None
    except LocalEntryNotFoundError:
        raise UserError(f"{name} is not a local folder, and the Hub repo of that name is neither reachable (offline?) "
                        "nor in the Hub cache ($HF_HUB_CACHE); connect once to download it, or pass a local folder") from None
    except (HFValidationError, OSError, ValueError) as error:  # HTTP errors are OSErrors
        raise UserError(f"cannot download {name} from the Hub ({first_line(error)}); pass a local folder, or retry") from None


def contained(root: Path, relative: Any, what: str) -> Path:
    """`root / relative`, refused unless `relative` is a relative path that stays inside `root`.

    Checked on the names alone: a Hub snapshot's files are links into the cache's blob store."""
    if not isinstance(relative, str) or not relative or Path(relative).is_absolute() or \
            os.path.normpath(relative).split(os.sep)[0] == "..":
        raise UserError(f"{root} names {what} {relative!r} outside itself; a shared folder must hold its parts "
                        "(re-save it with save_pretrained)")
    return root / relative


def check_repo_id(repo_id: str) -> str:
    """`repo_id` if it is a valid Hub repo id (org/name), else the one-line error."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UserError(f"--push-to-hub {repo_id!r} is not a Hub repo id ({first_line(error)}); pass one "
                        "like your-name/vqprior-digits") from None
    if "/" not in repo_id:
        raise UserError(f"--push-to-hub {repo_id!r} has no owner; pass one like your-name/{repo_id}")
    return repo_id


def upload_plan(folder: str | os.PathLike) -> dict[str, Path]:
    """What `push_folder` uploads, path in the repo -> local file: the model's own files and nothing else
    (its config and weights, a run's metrics.json and train_config.json, a prior's text_encoder/ folder, a
    pipeline's parts), never a run's checkpoints, logs or samples, or anything else the folder holds."""
    folder = Path(folder)
    plan = _model_files(folder, folder)
    check_self_contained(folder, plan)
    return plan


def _model_files(root: Path, folder: Path) -> dict[str, Path]:
    plan = {path.relative_to(root).as_posix(): path for path in (folder / name for name in MODEL_FILES)
            if path.is_file()}
    encoder = folder / ENCODER_FOLDER
    if encoder.is_dir():  # a pretrained text encoder's own files, as transformers saved them
        plan.update({path.relative_to(root).as_posix(): path for path in sorted(encoder.iterdir()) if path.is_file()})
    if (folder / PIPELINE_NAME).is_file():
        values = json.loads((folder / PIPELINE_NAME).read_text())
        for part in [values.get("tokenizer"), values.get("prior"), *(values.get("priors") or [])]:
            if part is not None and contained(folder, part, "a part").is_dir():
                plan.update(_model_files(root, folder / part))
    return plan


def check_self_contained(folder: Path, plan: dict[str, Path]) -> None:
    """Refuse a folder whose vqprior configs name a part outside it, or a part it does not hold."""
    if not plan:
        raise UserError(f"{folder} holds no model files; pass a tokenizer, prior or pipeline folder")
    for name, path in plan.items():
        if Path(name).name not in (CONFIG_NAME, PIPELINE_NAME):
            continue
        values = json.loads(path.read_text())
        if Path(name).name == CONFIG_NAME and "format_version" not in values:
            continue  # not a vqprior config (a transformers text encoder's, say)
        parent = Path(name).parent
        named = {key: value for key, value in values.items() if key.endswith("_path") and value is not None}
        if Path(name).name == PIPELINE_NAME:
            named = {"part": [values.get("tokenizer"), values.get("prior"), *(values.get("priors") or [])]}
        for key, value in named.items():
            for part in value if isinstance(value, list) else [value]:
                if part is None:
                    continue
                inside = (parent / contained(Path(""), part, key)).as_posix()
                if not any(file == inside or file.startswith(inside + "/") for file in plan):
                    raise UserError(f"{folder / name} names {key} {part!r}, which the folder does not hold; "
                                    "re-save it with save_pretrained")


def training_command() -> str:
    """The command line of this process, as a reader would type it (the interpreter as `python`)."""
    return shlex.join(["python", *sys.orig_argv[1:]])


def folder_kind(folder: Path) -> str:
    if (folder / PIPELINE_NAME).is_file():
        return "pipeline"
    values = json.loads((folder / CONFIG_NAME).read_text()) if (folder / CONFIG_NAME).is_file() else {}
    if "vocab_size" in values and "latent_shape" in values:
        return "prior"
    return "tokenizer" if "codebook_size" in values or "Tokenizer" in str(values.get("_class_name")) else "model"


def model_card(folder: str | os.PathLike, repo_id: str, command: str | None = None) -> str:
    """The README.md a pushed folder gets: what it is, how to load it, its config, metrics, how it was
    trained and the sha256 of every weights file (what a prior's provenance check compares)."""
    folder = Path(folder)
    plan = upload_plan(folder)
    kind = folder_kind(folder)
    config_file = folder / (PIPELINE_NAME if kind == "pipeline" else CONFIG_NAME)
    config = json.loads(config_file.read_text())
    what = config.get("_class_name", kind)
    if kind == "prior":
        what = f"{what} prior (arch {config.get('arch')!r}) over {config.get('latent_shape')} code grids"
    data = ModelCardData(library_name="vqprior", tags=["vqprior", kind, "image-generation"])
    sections = [f"# {repo_id}", f"A vqprior {kind}: {what}.", "## Load",
                "```python\n" + LOAD_SNIPPETS[kind].format(repo=repo_id, name=config.get("_class_name")) + "\n```",
                f"## Config (`{config_file.name}`)", "```json\n" + json.dumps(config, indent=2) + "\n```"]
    if (folder / "metrics.json").is_file():
        sections += ["## Metrics", "```json\n" + (folder / "metrics.json").read_text().strip() + "\n```"]
    if command is not None:
        sections += ["## Training command", f"```\n{command}\n```"]
    if (folder / "train_config.json").is_file():
        sections += ["## Training settings (`train_config.json`)",
                     "```json\n" + (folder / "train_config.json").read_text().strip() + "\n```"]
    hashes = [f"| `{name}` | `{file_sha256(path)}` |" for name, path in plan.items() if path.name == WEIGHTS_NAME]
    recorded = [f"| `{key}` ({name}) | `{value}` |" for name, path in plan.items() if path.name == CONFIG_NAME
                for key, value in json.loads(path.read_text()).items() if key.endswith("sha256") and value]
    sections += ["## Provenance", "| file or record | sha256 |\n| --- | --- |\n" + "\n".join(hashes + recorded)]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"))


def upload_warning() -> str | None:
    """Why an upload at the end of a run would fail, known before it starts (offline, or no token); None if
    nothing is known against it."""
    if constants.HF_HUB_OFFLINE:
        return ("HF_HUB_OFFLINE is set, so --push-to-hub will fail at the end; the model is saved locally, "
                "and python -m pipelines.push uploads it later")
    if get_token() is None:
        return ("no Hugging Face token (hf auth login, or HF_TOKEN), so --push-to-hub will fail at the end; "
                "the model is saved locally, and python -m pipelines.push uploads it later")
    return None


def push_folder(folder: str | os.PathLike, repo_id: str, command: str | None = None, revision: str | None = None,
                private: bool | None = None, token: str | None = None) -> str:
    """Upload `upload_plan(folder)` and its model card to the Hub repo `repo_id` (created if needed) as one
    commit; returns the commit's URL. A failed upload raises UploadFailed, saying how to retry; so does a
    folder that cannot be uploaded after a training run (`command` given), whose model stays saved."""
    folder = Path(folder)
    retry = f"python -m pipelines.push {shlex.quote(str(folder))} {repo_id}"
    check_repo_id(repo_id)
    try:
        plan = upload_plan(folder)
        card = model_card(folder, repo_id, command)
    except UserError as error:
        if command is None:
            raise
        raise UploadFailed(f"the trained model is saved in {folder}, but it cannot be uploaded: {error}") from None
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in plan.items()]
    operations.append(CommitOperationAdd(path_in_repo=MODEL_CARD_NAME, path_or_fileobj=card.encode()))
    api = HfApi(token=token, library_name="vqprior")
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.create_commit(repo_id, operations, commit_message=f"Upload vqprior {folder_kind(folder)}",
                                   revision=revision)
    except Exception as error:  # offline, no token, no rights, network: the folder stays, the retry is one command
        raise UploadFailed(f"uploading {folder} to the Hub repo {repo_id} failed ({first_line(error)[:200]}); the "
                           f"model is saved in {folder}; retry with: {retry}") from None
    return commit.commit_url
