"""Encode a dataset once into code grids:
`python -m stage1_vqvae.export --tokenizer DIR --dataset digits --split train --output DIR`.

The rows are cut into fixed chunks of `--chunk-rows`; each process encodes its share of the chunks
(round robin) into a staging folder beside --output, one file a chunk, written atomically. When
all chunks exist, the main process assembles them in source order and renames the result to
--output. A killed export leaves only the staging folder; running the same command again encodes
the missing chunks and finishes. Memory stays bounded by one chunk.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from shared.codes import CAPTIONS_NAME, CODES_FORMAT_VERSION, CODES_META_NAME, CodesMetadata
from shared.codes_format import CAPTION_COLUMN
from shared.config import config_to_dict, parse_args, write_json_atomic
from shared.data import (DataConfig, ImageDataset, check_captions, first_image_channels, load_split, open_source,
                         resolve_num_workers, sequential_batches)
from shared.data.streaming import Stream, StreamingConfig
from shared.errors import UserError, run_cli
from shared.runtime import local_process_count, make_accelerator
from stage1_vqvae.evaluate import add_source_arguments, data_config_for
from stage1_vqvae.tokenizer import load_tokenizer, shortcut_class, tokenizer_path

JOB_NAME = "job.json"


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Encode a dataset into a codes dataset (stage 1 -> stage 2).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="a trained tokenizer folder")
    add_source_arguments(parser, default_split="train")
    parser.add_argument("--output", required=True, help="the codes folder to write")
    parser.add_argument("--format", default="arrow", choices=["arrow", "npy"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--chunk-rows", type=int, default=4096, help="rows per staged chunk (bounds memory)")
    parser.add_argument("--streaming", action="store_true",
                        help="read --dataset as a stream (tar shards, a Hub set, local data files): chunks are encoded "
                             "as they arrive, nothing is listed or loaded whole (captions are not carried)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return parser


def export(argv: Sequence[str] | None = None) -> dict:
    """Run the export; returns a summary (rows, seconds, images/s)."""
    args = parse_args(parser(), argv)
    output = Path(args.output).expanduser().resolve()
    if args.batch_size < 1 or args.chunk_rows < 1:
        raise UserError("--batch-size and --chunk-rows must be at least 1")
    if output.exists() and not args.overwrite:
        raise UserError(f"{output} already exists; pass --overwrite to replace it or choose another --output")
    dataset_path = Path(args.dataset).expanduser()
    if dataset_path.is_dir() and output.is_relative_to(dataset_path.resolve()):
        raise UserError(f"--output {output} lies inside the dataset folder {dataset_path}; write it elsewhere, "
                        "or the codes would become part of the dataset")
    tokenizer = tokenizer_for(args)
    # An export never substitutes an unreadable image: its row of codes would silently be another image's.
    data_config = data_config_for(args, tokenizer, strict=True)
    if args.streaming:
        return _export_stream(args, tokenizer, data_config, output)
    image_size = data_config.image_size
    source = open_source(data_config)
    channels = first_image_channels(source, args.split, data_config.channels,
                                    fix=f"this tokenizer takes {tokenizer.config.in_channels}-channel images")
    dataset = load_split(data_config, source=source, channels=channels)
    if source.label_column is not None and not dataset.has_labels:
        print(f"note: no row of [{args.split}] has a label; the codes are written without labels", file=sys.stderr)
    check_captions(dataset.captions, f"{source.description} [{args.split}]", data_config.strict_captions)
    num_workers = resolve_num_workers(args.num_workers, local_process_count())

    accelerator = make_accelerator()
    tokenizer.to(accelerator.device)
    staging = output.with_name(f".{output.name}.partial")
    captions = dataset.captions
    metadata = codes_metadata(args, tokenizer, image_size, len(dataset), dataset.has_labels, dataset.source.label_names,
                              captions is not None, dataset.source.image_column, dataset.source.label_column,
                              dataset.source.caption_column)
    created_staging = not staging.exists()
    if accelerator.is_main_process:
        _prepare_staging(staging, {"metadata": metadata.to_json(), "chunk_rows": args.chunk_rows})
    accelerator.wait_for_everyone()

    chunks = [range(start, min(start + args.chunk_rows, len(dataset))) for start in range(0, len(dataset), args.chunk_rows)]
    mine = [chunk for index, chunk in enumerate(chunks) if index % accelerator.num_processes == accelerator.process_index]
    todo = [chunk for chunk in mine if not _chunk_is_complete(staging, chunk)]
    started = time.perf_counter()
    try:
        _encode_chunks(tokenizer, dataset, todo, staging, metadata, args.batch_size,
                       accelerator.device, num_workers, progress=args.progress and accelerator.is_main_process,
                       total=sum(len(chunk) for chunk in mine),
                       done=sum(len(chunk) for chunk in mine if chunk not in todo),
                       num_processes=accelerator.num_processes)
    except UserError:
        # a bad image: leave the disk as it was (a resumed job keeps its earlier chunks)
        if created_staging and accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _finish(staging, chunks, metadata, args.format, captions, output)
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - started
    summary = {"output": str(output), "num_rows": len(dataset), "seconds": seconds,
               "images_per_second": len(dataset) / max(seconds, 1e-9)}
    if accelerator.is_main_process:
        print(json.dumps(summary))
    return summary


def codes_metadata(args: argparse.Namespace, tokenizer, image_size: int, num_rows: int, has_labels: bool,
                   label_names: list[str] | None, has_captions: bool, image_column: str | None,
                   label_column: str | None, caption_column: str | None) -> CodesMetadata:
    """What codes.json says of this export."""
    levels = tokenizer.code_layout(image_size)
    return CodesMetadata(
        format_version=1 if tokenizer.first_codes_format and len(levels) == 1 and levels[0].depth == 1
        and not has_captions else CODES_FORMAT_VERSION,  # the first release's format where it fits, as it wrote it
        format=args.format, levels=levels, num_rows=num_rows, has_labels=has_labels, label_names=label_names,
        tokenizer_class=type(tokenizer).__name__, tokenizer_config=config_to_dict(tokenizer.config),
        tokenizer_sha256=tokenizer.weights_sha256(), tokenizer_path=tokenizer_path(args.tokenizer),
        scales=tokenizer.scales, has_captions=has_captions,
        source={"dataset": args.dataset, "split": args.split, "image_size": image_size,
                "channels": tokenizer.config.in_channels, "image_column": image_column,
                "label_column": label_column, "caption_column": caption_column})


def _export_stream(args: argparse.Namespace, tokenizer, data_config: DataConfig, output: Path) -> dict:
    """--streaming: the split read once in order, `--chunk-rows` records at a time (memory stays bounded by
    one chunk); process r encodes chunks r, r + N, ... (every process reads the stream, decoding only its
    own); a killed export re-reads the stream and encodes only the chunks it had not staged."""
    stream = Stream(data_config, StreamingConfig(streaming=True), held_out=False)
    channels = stream.first_channels(tokenizer.config.in_channels,
                                     fix=f"this tokenizer takes {tokenizer.config.in_channels}-channel images")
    accelerator = make_accelerator()
    tokenizer.to(accelerator.device)
    num_workers = resolve_num_workers(args.num_workers, local_process_count())
    staging = output.with_name(f".{output.name}.partial")
    job = {"streamed": codes_metadata(args, tokenizer, data_config.image_size, 0, False, stream.label_names, False,
                                      stream.image_column, stream.label_column, None).to_json(),
           "chunk_rows": args.chunk_rows}
    created_staging = not staging.exists()
    if accelerator.is_main_process:
        _prepare_staging(staging, job)
    accelerator.wait_for_everyone()
    levels = tokenizer.code_layout(data_config.image_size)
    started, chunks = time.perf_counter(), []
    from tqdm.auto import tqdm

    bar = tqdm(unit="img", desc="exporting (streamed)", disable=not (args.progress and accelerator.is_main_process),
               dynamic_ncols=True)
    try:
        for index, (rows, records) in enumerate(stream.chunks(args.chunk_rows)):
            chunks.append(rows)
            if index % accelerator.num_processes == accelerator.process_index and not _chunk_is_complete(staging, rows):
                batches = stream.decoded_batches(channels, rows, records, args.batch_size, num_workers)
                _encode_chunk(tokenizer, batches, rows, staging, levels, accelerator.device)
            bar.update(len(rows))
    except UserError:  # a bad image: leave the disk as it was, as a listed export does
        if created_staging and accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    bar.close()
    accelerator.wait_for_everyone()
    num_rows = chunks[-1].stop if chunks else 0
    if num_rows == 0:
        raise UserError(f"{stream.description} [{args.split}] is empty; point --dataset at a source with images")
    if accelerator.is_main_process:
        has_labels = any(bool((_read_chunk(staging, rows)[1] >= 0).any()) for rows in chunks)
        metadata = codes_metadata(args, tokenizer, data_config.image_size, num_rows, has_labels, stream.label_names,
                                  False, stream.image_column, stream.label_column, None)
        _finish(staging, chunks, metadata, args.format, None, output)
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - started
    summary = {"output": str(output), "num_rows": num_rows, "seconds": seconds,
               "images_per_second": num_rows / max(seconds, 1e-9)}
    if accelerator.is_main_process:
        print(json.dumps(summary))
    return summary


def tokenizer_for(args: argparse.Namespace):
    """The --tokenizer folder, or the tokenizer a shortcut such as pixels:K names (channels from the first image)."""
    if shortcut_class(args.tokenizer) is None:
        return load_tokenizer(args.tokenizer)
    probe = DataConfig(dataset=args.dataset, split=args.split, image_size=args.image_size or 32,
                       image_column=args.image_column, label_column=args.label_column,
                       dataset_config=args.dataset_config, revision=args.revision)
    channels = (Stream(probe, StreamingConfig(streaming=True), held_out=False).first_channels(None) if args.streaming
                else first_image_channels(open_source(probe), args.split, None))
    return load_tokenizer(args.tokenizer, channels=channels, image_size=probe.image_size)


def _finish(staging: Path, chunks: list[range], metadata: CodesMetadata, format: str, captions: np.ndarray | None,
            output: Path) -> None:
    """Assemble the staged chunks in source order into --output (main process)."""
    missing = [chunk for chunk in chunks if not _chunk_is_complete(staging, chunk)]
    if missing:
        raise UserError(f"{len(missing)} chunk(s) are missing in {staging}; run the export again to finish")
    assembled = staging / "assembled"
    shutil.rmtree(assembled, ignore_errors=True)
    if format == "arrow":
        _assemble_arrow(staging, chunks, assembled, metadata, captions)
    else:
        _assemble_npy(staging, chunks, assembled, metadata)
        if captions is not None:
            write_json_atomic(assembled / CAPTIONS_NAME, captions.tolist())
    write_json_atomic(assembled / CODES_META_NAME, metadata.to_json())
    _move_into_place(assembled, output)
    shutil.rmtree(staging, ignore_errors=True)


def _prepare_staging(staging: Path, job: dict) -> None:
    """Keep a staging folder of the same job (resume); start afresh when it belongs to another job."""
    job_path = staging / JOB_NAME
    if staging.is_dir():
        try:
            same = json.loads(job_path.read_text()) == job
        except (OSError, json.JSONDecodeError):
            same = False
        if same:
            return
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    write_json_atomic(job_path, job)


def _chunk_path(staging: Path, rows: range) -> Path:
    return staging / f"rows_{rows.start:010d}_{rows.stop:010d}.npz"


def _chunk_is_complete(staging: Path, rows: range) -> bool:
    """A staged chunk that exists and reads back with all its rows (a crash can leave an empty file)."""
    path = _chunk_path(staging, rows)
    if not path.is_file():
        return False
    try:
        columns, labels = _read_chunk(staging, rows)
    except (OSError, ValueError, KeyError, EOFError):
        return False
    return len(labels) == len(rows) and all(len(codes) == len(rows) for codes in columns.values())


def _encode_chunks(tokenizer, dataset: ImageDataset, chunks: list[range], staging: Path, metadata: CodesMetadata,
                   batch_size: int, device: torch.device, num_workers: int, progress: bool, total: int, done: int,
                   num_processes: int) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(total=total * num_processes, initial=done * num_processes, unit="img", desc="exporting",
               disable=not progress, dynamic_ncols=True)
    for rows in chunks:
        batches = sequential_batches(dataset, rows, batch_size, num_workers, pin_memory=device.type == "cuda")
        _encode_chunk(tokenizer, batches, rows, staging, metadata.levels, device)
        bar.update(len(rows) * num_processes)  # the other processes advance at the same pace
    bar.close()


def _encode_chunk(tokenizer, batches: Iterator, rows: range, staging: Path, levels, device: torch.device) -> None:
    """Encode one chunk's batches and stage its codes and labels as one file, written atomically."""
    parts: dict[str, list[np.ndarray]] = {level.column: [] for level in levels}
    labels = []
    for batch in batches:
        with torch.inference_mode():
            codes = tokenizer.encode(batch.images(device))  # (B, h, w[, D]), or a dict per level
        for level in levels:
            grid = codes[level.name] if isinstance(codes, dict) else codes
            parts[level.column].append(grid.cpu().numpy().astype(level.dtype))
        labels.extend(batch.labels.tolist())
    path = _chunk_path(staging, rows)
    temporary = path.with_name(f".{path.stem}.tmp.npz")
    with open(temporary, "wb") as handle:
        np.savez(handle, **{column: np.concatenate(arrays) for column, arrays in parts.items()},
                 labels=np.asarray(labels, dtype=np.int64))
        handle.flush()
        os.fsync(handle.fileno())  # the rename must never publish a chunk that is not on disk
    os.replace(temporary, path)


def _read_chunk(staging: Path, rows: range) -> tuple[dict[str, np.ndarray], np.ndarray]:
    with np.load(_chunk_path(staging, rows)) as chunk:
        return {name: chunk[name] for name in chunk.files if name != "labels"}, chunk["labels"]


def _assemble_arrow(staging: Path, chunks: list[range], destination: Path, metadata: CodesMetadata,
                    captions: np.ndarray | None) -> None:
    import datasets

    datasets.disable_progress_bars()
    features = {level.column: (datasets.Array2D(shape=level.grid_shape, dtype=level.dtype) if level.depth == 1
                               else datasets.Array3D(shape=level.grid_shape, dtype=level.dtype))
                for level in metadata.levels}
    features["source_index"] = datasets.Value("int64")
    if metadata.has_labels:
        features["label"] = (datasets.ClassLabel(names=metadata.label_names) if metadata.label_names
                             else datasets.Value("int64"))
    if captions is not None:
        features[CAPTION_COLUMN] = datasets.Value("string")

    def rows() -> Iterator[dict]:
        for chunk in chunks:
            columns, labels = _read_chunk(staging, chunk)
            for offset, index in enumerate(chunk):
                row = {column: values[offset] for column, values in columns.items()}
                row["source_index"] = index
                if metadata.has_labels:
                    row["label"] = int(labels[offset])
                if captions is not None:
                    row[CAPTION_COLUMN] = captions[index]
                yield row

    table = datasets.Dataset.from_generator(rows, features=datasets.Features(features),
                                            cache_dir=str(staging / "cache"), keep_in_memory=False)
    table.save_to_disk(str(destination))
    del table
    shutil.rmtree(staging / "cache", ignore_errors=True)


def _assemble_npy(staging: Path, chunks: list[range], destination: Path, metadata: CodesMetadata) -> None:
    destination.mkdir(parents=True)
    outputs = {level.column: np.lib.format.open_memmap(destination / f"{level.column}.npy", mode="w+",
                                                       dtype=level.dtype, shape=(metadata.num_rows, *level.grid_shape))
               for level in metadata.levels}
    labels_out = np.lib.format.open_memmap(destination / "labels.npy", mode="w+", dtype=np.int64,
                                           shape=(metadata.num_rows,)) if metadata.has_labels else None
    for chunk in chunks:
        columns, labels = _read_chunk(staging, chunk)
        for column, values in columns.items():
            outputs[column][chunk.start:chunk.stop] = values
        if labels_out is not None:
            labels_out[chunk.start:chunk.stop] = labels
    for array in outputs.values():
        array.flush()
    del outputs, labels_out


def _move_into_place(assembled: Path, output: Path) -> None:
    """Rename the finished folder to --output; an old --output (with --overwrite) goes only after."""
    retired = output.with_name(f".{output.name}.old")
    if output.exists():
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(output, retired)
    os.replace(assembled, output)
    shutil.rmtree(retired, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(export, argv)


if __name__ == "__main__":
    sys.exit(main())
