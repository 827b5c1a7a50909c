"""Upload a tokenizer, prior or pipeline folder to the Hugging Face Hub, with a model card:
`python -m pipelines.push FOLDER your-name/model-name`.

What goes up is the model's own files (`shared.hub.upload_plan`: never a run's checkpoints, logs or
samples) and a README.md model card (`shared.hub.model_card`). `--dry-run` prints both and uploads
nothing. A training command does the same at its end with `--push-to-hub REPO`; when that upload
fails, this command retries it.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from shared.config import parse_args
from shared.errors import UserError, run_cli
from shared.hub import check_repo_id, model_card, push_folder, upload_plan


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Upload a model folder to the Hugging Face Hub.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("folder", help="a tokenizer, prior or pipeline folder (or a training run's output folder)")
    parser.add_argument("repo_id", help="the Hub repo to upload to, org/name (created if needed)")
    parser.add_argument("--revision", default=None, help="the branch to commit to (default: main)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--dry-run", action="store_true", help="print the files and the model card; upload nothing")
    return parser


def push(argv: Sequence[str] | None = None) -> str | None:
    args = parse_args(parser(), argv)
    folder = Path(args.folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; pass a tokenizer, prior or pipeline folder")
    check_repo_id(args.repo_id)
    if args.dry_run:
        for name, path in upload_plan(folder).items():
            print(f"{name}\t{path.stat().st_size} bytes")
        print(model_card(folder, args.repo_id))
        return None
    url = push_folder(folder, args.repo_id, revision=args.revision, private=args.private or None)
    print(url)
    return url


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(push, argv)


if __name__ == "__main__":
    sys.exit(main())
