"""shared/hub.py: folders shared through the Hub. Nothing touches the network: downloads are read from a
local Hub cache made here (the layout huggingface_hub reads offline), uploads are checked by what they
would send."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants

from conftest import TINY_TOKENIZER_FLAGS, run_module
from pipelines import Pipeline
from shared.errors import UploadFailed, UserError
from shared.files import file_sha256
from shared.hub import MODEL_CARD_NAME, model_card, push_folder, resolve_folder, upload_plan
from stage1_vqvae import VQVAE, VQVAEConfig
from stage1_vqvae.tokenizer import load_tokenizer
from stage2_prior import GatedPixelCNN, Prior, PriorConfig


def add_to_hub_cache(cache: Path, repo_id: str, folder: Path, revision: str = "main") -> str:
    """Put what `push_folder` would upload from `folder` (its files and model card) into the Hub cache
    `cache` as a commit of `repo_id` named `revision`, with the blob store and links huggingface_hub
    writes; returns the commit hash."""
    files = {name: path.read_bytes() for name, path in upload_plan(folder).items()}
    files[MODEL_CARD_NAME] = model_card(folder, repo_id).encode()
    commit = hashlib.sha1(repr(sorted((name, hashlib.sha1(data).hexdigest()) for name, data in files.items()))
                          .encode() + revision.encode()).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return commit


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty local Hub cache, read offline (no request leaves this machine)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    torch.manual_seed(0)
    tokenizer = VQVAE(VQVAEConfig(image_size=16, hidden_channels=8, latent_channels=8, num_res_blocks=1,
                                  codebook_size=16))
    tokenizer(torch.rand(8, 1, 16, 16) * 2 - 1)  # k-means init of the codebook
    prior = GatedPixelCNN(PriorConfig(vocab_size=16, latent_shape=(4, 4), num_classes=3, hidden_channels=8,
                                      num_layers=3, tokenizer_sha256=tokenizer.weights_sha256()))
    return Pipeline(tokenizer.eval(), prior.eval()).save_pretrained(tmp_path_factory.mktemp("pipe") / "pipeline")


def test_pipeline_prior_and_tokenizer_load_from_the_hub_cache(pipeline_dir, offline_hub):
    add_to_hub_cache(offline_hub, "someone/digits", pipeline_dir)
    local = Pipeline.from_pretrained(pipeline_dir, device="cpu").generate(4, labels=1, seed=3, output_type="pt")
    hub = Pipeline.from_pretrained("someone/digits", device="cpu").generate(4, labels=1, seed=3, output_type="pt")
    assert torch.equal(local.codes, hub.codes) and torch.equal(local.images, hub.images)
    add_to_hub_cache(offline_hub, "someone/prior", pipeline_dir / "prior")
    add_to_hub_cache(offline_hub, "someone/tokenizer", pipeline_dir / "tokenizer")
    prior, tokenizer = Prior.from_pretrained("someone/prior"), load_tokenizer("someone/tokenizer")
    assert all(torch.equal(a, b) for a, b in zip(prior.state_dict().values(),
                                                  Prior.from_pretrained(pipeline_dir / "prior").state_dict().values()))
    assert tokenizer.weights_sha256() == prior.config.tokenizer_sha256  # the provenance the pipeline checks
    # the snapshot's files are links into the blob store: the folder loads from inside the cache
    assert resolve_folder("someone/prior").is_relative_to(offline_hub)


def test_generate_command_reads_a_hub_repo(pipeline_dir, tmp_path):
    cache = tmp_path / "hub"
    add_to_hub_cache(cache, "someone/digits", pipeline_dir)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    for name, source in (("hub", "someone/digits"), ("local", str(pipeline_dir))):
        result = run_module("pipelines.generate", "--pipeline", source, "--num-images", "4", "--labels", "2",
                            "--output-dir", str(tmp_path / f"out_{name}"), "--no-progress", env=env)
        assert result.returncode == 0, result.stderr
    assert (tmp_path / "out_hub" / "codes.npy").read_bytes() == (tmp_path / "out_local" / "codes.npy").read_bytes()
    missing = run_module("pipelines.generate", "--pipeline", "someone/absent", "--num-images", "4",
                         "--output-dir", str(tmp_path / "none"), env=env)
    assert missing.returncode == 2 and "Hub cache" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1


def test_revisions_and_missing_repos(pipeline_dir, offline_hub, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(pipeline_dir / "prior", changed)
    prior = Prior.from_pretrained(changed)
    with torch.no_grad():
        next(prior.parameters()).add_(1.0)
    prior.save_pretrained(changed)
    first = add_to_hub_cache(offline_hub, "someone/prior", pipeline_dir / "prior", revision="v1")
    add_to_hub_cache(offline_hub, "someone/prior", changed, revision="main")
    newest, tagged = Prior.from_pretrained("someone/prior"), Prior.from_pretrained("someone/prior", revision="v1")
    by_commit = Prior.from_pretrained("someone/prior", revision=first)
    assert not torch.equal(next(newest.parameters()), next(tagged.parameters()))
    assert torch.equal(next(tagged.parameters()), next(by_commit.parameters()))
    with pytest.raises(UserError, match="neither reachable .* nor in the Hub cache"):
        Prior.from_pretrained("someone/absent")
    with pytest.raises(UserError, match="applies to Hub repos"):
        Prior.from_pretrained(pipeline_dir / "prior", revision="v1")


def test_a_shared_folder_names_nothing_outside_itself(pipeline_dir, tmp_path, offline_hub):
    pipe = tmp_path / "pipe"
    shutil.copytree(pipeline_dir, pipe)
    values = json.loads((pipe / "pipeline.json").read_text())
    shutil.copytree(pipe / "tokenizer", tmp_path / "tokenizer")
    for part in ("../tokenizer", str(tmp_path / "tokenizer")):
        (pipe / "pipeline.json").write_text(json.dumps({**values, "tokenizer": part}))
        with pytest.raises(UserError, match="outside itself"):
            Pipeline.from_pretrained(pipe, device="cpu")
        with pytest.raises(UserError, match="outside itself"):
            upload_plan(pipe)
    prior = tmp_path / "prior"
    shutil.copytree(pipeline_dir / "prior", prior)
    config = json.loads((prior / "config.json").read_text())
    (prior / "config.json").write_text(json.dumps({**config, "text_encoder_path": "/elsewhere/t5"}))
    with pytest.raises(UserError, match="outside itself"):
        upload_plan(prior)
    (prior / "config.json").write_text(json.dumps({**config, "text_encoder_path": "text_encoder"}))
    with pytest.raises(UserError, match="does not hold"):
        upload_plan(prior)


def test_upload_plan_holds_the_model_files_only(pipeline_dir, tmp_path):
    prior = tmp_path / "prior"
    shutil.copytree(pipeline_dir / "prior", prior)
    (prior / "notes.txt").write_text("private")
    (prior / "codes").mkdir()
    (prior / "codes" / "chunk.npz").write_bytes(b"data")
    encoder = prior / "text_encoder"  # a transformers folder: its own config names where it came from
    encoder.mkdir()
    (encoder / "config.json").write_text(json.dumps({"_name_or_path": "/home/someone/t5", "model_type": "t5"}))
    (encoder / "model.safetensors").write_bytes(b"weights")
    assert sorted(upload_plan(prior)) == ["config.json", "model.safetensors", "text_encoder/config.json",
                                          "text_encoder/model.safetensors"]


def test_upload_plan_and_model_card_of_a_training_run(tiny_tokenizer):
    plan = upload_plan(tiny_tokenizer)
    assert sorted(plan) == ["config.json", "metrics.json", "model.safetensors", "train_config.json"]
    assert (tiny_tokenizer / "checkpoints").is_dir()  # there, and not uploaded
    card = model_card(tiny_tokenizer, "someone/tok", command="vqvae-train --output-dir run")
    assert "library_name: vqprior" in card and "load_tokenizer('someone/tok')" in card
    assert file_sha256(tiny_tokenizer / "model.safetensors") in card
    assert "vqvae-train --output-dir run" in card and '"psnr"' in card  # the command and the metrics


def test_push_sends_the_plan_and_the_card(pipeline_dir, monkeypatch):
    sent = {}
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: sent.update(repo=repo_id))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", lambda self, repo_id, operations, **kw: sent.update(
        files={op.path_in_repo: op.path_or_fileobj for op in operations}) or
        type("Commit", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})())
    assert push_folder(pipeline_dir, "someone/digits") == "https://hub/someone/digits/commit/1"
    assert sent["repo"] == "someone/digits"
    assert set(sent["files"]) == {*upload_plan(pipeline_dir), "README.md"}
    assert "Pipeline.from_pretrained('someone/digits')" in sent["files"]["README.md"].decode()
    assert sorted(sent["files"]) == sorted(["README.md", "pipeline.json", "prior/config.json",
                                           "prior/model.safetensors", "tokenizer/config.json",
                                           "tokenizer/model.safetensors"])


def test_pipeline_save_pretrained_pushes_and_warnings_come_first(pipeline_dir, tmp_path, monkeypatch):
    import shared.hub

    sent = {}
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", lambda self, repo_id, operations, **kw: sent.update(
        files=sorted(op.path_in_repo for op in operations)) or type("Commit", (), {"commit_url": "url"})())
    Pipeline.from_pretrained(pipeline_dir, device="cpu").save_pretrained(tmp_path / "copy", push_to_hub=True,
                                                                          repo_id="someone/copy")
    assert sent["files"] == sorted([*upload_plan(tmp_path / "copy"), "README.md"])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(shared.hub, "get_token", lambda: None)
    assert "no Hugging Face token" in shared.hub.upload_warning()
    monkeypatch.setattr(shared.hub, "get_token", lambda: "hf_token")
    assert shared.hub.upload_warning() is None


def test_push_offline_fails_with_the_retry_and_keeps_the_folder(pipeline_dir, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UploadFailed, match=f"retry with: python -m pipelines.push {pipeline_dir} someone/digits"):
        push_folder(pipeline_dir, "someone/digits")
    with pytest.raises(UserError, match="needs repo_id"):
        Prior.from_pretrained(pipeline_dir / "prior").save_pretrained(pipeline_dir / "other", push_to_hub=True)
    assert not (pipeline_dir / "other").exists()


def test_training_command_pushes_at_the_end_and_keeps_the_run_when_offline(tmp_path):
    output = tmp_path / "run"
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    bad = run_module("stage1_vqvae.train", "--output-dir", str(output), "--push-to-hub", "not a repo",
                     *TINY_TOKENIZER_FLAGS, env=env)
    assert bad.returncode == 2 and "not a Hub repo id" in bad.stderr and not output.exists()
    result = run_module("stage1_vqvae.train", "--output-dir", str(output), "--max-steps", "2", "--push-to-hub",
                        "someone/tok", *TINY_TOKENIZER_FLAGS, env=env)
    assert result.returncode == 1, result.stderr
    assert "HF_HUB_OFFLINE is set" in result.stderr  # said before training
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: uploading") and f"retry with: python -m pipelines.push {output} someone/tok" in last
    assert (output / "model.safetensors").is_file() and json.loads(result.stdout.splitlines()[-1])["output_dir"]
    dry = run_module("pipelines.push", str(output), "someone/tok", "--dry-run", env=env)
    assert dry.returncode == 0 and "model.safetensors" in dry.stdout and "## Provenance" in dry.stdout
