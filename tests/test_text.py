"""Text to image (the shapes dataset and its checker: test_shapes.py): captions through sources and exports, the caption
tokenizer, text-conditioned priors (exact seeded sampling over every method, guidance on text), training
from captioned codes, prompts through the pipeline and the CLI, and the bad input of each."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_module, tree_digest
from pipelines.captions import caption_accuracy
from shared.codes import open_codes
from shared.data import DataConfig, load_split, open_source
from shared.data.shapes import shapes_split
from shared.errors import UserError
from stage1_vqvae.export import export
from stage1_vqvae.export import main as export_main
from stage2_prior import ARCHS, Prior, PriorConfig
from stage2_prior.text import TextEncoder, encode_captions, text_vocab_size, train_text_tokenizer

TEXT_CASES = [(name, encoder) for name, spec in ARCHS.items() for encoder in spec.text_encoders]
PROMPTS = ["a small red circle", "a large blue square left of a small yellow triangle", "a large green triangle"]


@pytest.fixture(scope="module")
def caption_tokenizer():
    return train_text_tokenizer(shapes_split("train", 300)[1], 48)


def text_prior(arch: str, tokenizer, caption_dropout: float = 0.1, dtype=torch.float64, encoder: str = "transformer",
               **extra) -> Prior:
    torch.manual_seed(0)
    shape = (1, 14) if ARCHS[arch].reads == "scales" else (3, 4)  # a pyramid of scales 1 2 3 is one row of 14
    values = {**ARCHS[arch].tiny, "vocab_size": 9, "latent_shape": shape, "dropout": 0.0, "text_encoder": encoder, **extra,
              "text_tokenizer": tokenizer, "text_length": 12, "text_layers": 1, "caption_dropout": caption_dropout}
    model = Prior.from_config(PriorConfig.build(arch=arch, **values)).to(dtype).eval()
    for parameter in model.parameters():
        parameter.data.normal_(0, 0.4)
    return model


# ------------------------------------------------------------------------------------------------
# Captions through sources and exports
# ------------------------------------------------------------------------------------------------

def saved_captioned(root, captions, column="text"):
    import datasets

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in captions]
    datasets.Dataset.from_dict({"image": images, column: captions}).save_to_disk(str(root))
    return root


def test_captions_of_saved_datasets_and_image_folders(tmp_path):
    saved = saved_captioned(tmp_path / "saved", ["one", "two", "", "four"])
    split = load_split(DataConfig(dataset=str(saved), image_size=8))
    assert split.captions.tolist() == ["one", "two", None, "four"]
    assert load_split(DataConfig(dataset=str(saved), image_size=8, caption_column="none")).captions is None
    folder = tmp_path / "folder"
    folder.mkdir()
    for index in range(3):
        Image.new("RGB", (8, 8), (index * 50, 0, 0)).save(folder / f"{index}.png")
    lines = [{"file_name": f"{index}.png", "text": f"image {index}"} for index in (2, 0)]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    rows = load_split(DataConfig(dataset=str(folder), image_size=8))
    assert rows.captions.tolist() == ["image 0", None, "image 2"]
    with pytest.raises(UserError, match=r"has no column 'caption' \(columns: file_name, text\)"):
        load_split(DataConfig(dataset=str(folder), image_size=8, caption_column="caption"))
    with pytest.raises(UserError, match=r"has no column 'words' \(columns: image, text\); fix --caption-column"):
        open_source(DataConfig(dataset=str(saved), caption_column="words"))
    with pytest.raises(UserError, match="does not hold text"):
        open_source(DataConfig(dataset=str(saved), caption_column="image"))
    with pytest.raises(UserError, match="--dataset digits has no captions"):
        open_source(DataConfig(caption_column="text"))


def test_export_carries_captions_and_strict_captions_refuses(tmp_path, capsys):
    saved = saved_captioned(tmp_path / "saved", ["a red one", None, "a blue one"])
    for form in ("arrow", "npy"):
        export(["--tokenizer", "pixels:4", "--dataset", str(saved), "--image-size", "4", "--output",
                str(tmp_path / form), "--format", form, "--no-progress"])
        codes, metadata = open_codes(tmp_path / form)
        assert metadata.has_captions and codes.captions.tolist() == ["a red one", None, "a blue one"]
        assert codes.subset(np.array([2, 0])).captions.tolist() == ["a blue one", "a red one"]
    assert "1 of the 3 rows" in capsys.readouterr().err
    before = tree_digest(tmp_path)
    code = export_main(["--tokenizer", "pixels:4", "--dataset", str(saved), "--image-size", "4", "--output",
                        str(tmp_path / "strict"), "--strict-captions", "--no-progress"])
    assert code == 2 and "empty or non-string caption" in capsys.readouterr().err
    assert tree_digest(tmp_path) == before


# ------------------------------------------------------------------------------------------------
# Text-conditioned priors
# ------------------------------------------------------------------------------------------------

def test_caption_tokenizer_pads_truncates_and_warns(caption_tokenizer, capsys):
    ids = encode_captions(caption_tokenizer, ["a small red circle", None, "a " * 40], 8)
    assert ids.shape == (3, 8) and (ids[:, 0] == 1).all()
    assert (ids[0, 1:] > 2).sum() >= 4 and (ids[1, 1:] == 0).all() and (ids[2] != 0).all()
    assert "longer than the prior's 7 text tokens" in capsys.readouterr().err


def test_text_encoder_reads_word_order_from_the_start(caption_tokenizer, capsys):
    """Words and positions start on one scale: otherwise the encoder reads a bag of words, and "red circle ... blue
    square" cannot be told from "blue circle ... red square" (the binding shapes' relations need)."""
    ids = encode_captions(caption_tokenizer, ["a small red circle above a large blue square",
                                              "a small blue circle above a large red square"], 24)
    real = (ids != 0)[..., None]  # (2, L, 1)
    for seed in range(3):
        torch.manual_seed(seed)
        memory = TextEncoder(text_vocab_size(caption_tokenizer), 24, 64, 1, 2, 0.0).eval()(ids).states  # (2, L, C)
        pooled = (memory * real).sum(1) / real.sum(1)  # (2, C): the same words, so only their order differs
        assert (pooled[0] - pooled[1]).norm() > 0.02 * pooled[0].norm()  # 0.003 with nn.Embedding's N(0, 1)
    assert "longer than" not in capsys.readouterr().err  # both whole


@pytest.mark.parametrize("arch, encoder", TEXT_CASES)
def test_text_samples_are_exact_for_every_method_batch_and_guidance(arch, encoder, caption_tokenizer):
    model = text_prior(arch, caption_tokenizer, encoder=encoder)
    for guidance in (0.0, 2.0):
        reference = model.sample(3, prompt=PROMPTS, seed=5, guidance_scale=guidance)
        # the compiled step once (compiling costs seconds); a CUDA graph needs a GPU
        methods = [m for m in model.sampling_methods if m != "graph" and (m != "compiled" or not guidance)]
        windowed = model.state_class() is not None and model.state_class().has_window()
        for method, window in [(m, None) for m in methods] + ([("jacobi", 5)] if windowed else []):
            for precision in ("float64", "float32"):
                assert torch.equal(model.sample(3, prompt=PROMPTS, seed=5, guidance_scale=guidance, method=method,
                                                window=window, precision=precision), reference), (method, guidance)
        # a prompt's sample does not depend on the other prompts of its batch
        alone = model.sample(1, prompt=PROMPTS[1], seed=5, sample_offset=1, guidance_scale=guidance)
        assert torch.equal(alone, reference[1:2])


@pytest.mark.parametrize("arch, encoder", TEXT_CASES)
def test_text_reaches_every_position_and_trains(arch, encoder, caption_tokenizer, tmp_path):
    model = text_prior(arch, caption_tokenizer, encoder=encoder)
    codes = torch.randint(0, 9, (2, *model.code_shape), generator=torch.Generator().manual_seed(1))
    first = model(codes, prompt=[PROMPTS[0]] * 2)
    second = model(codes, prompt=[PROMPTS[0], PROMPTS[1]])
    assert torch.equal(first[0], second[0])  # rows do not mix
    assert (first[1] - second[1]).abs().amax(0).min() > 1e-9  # the caption reaches every position
    model.train()
    model.training_loss(codes, prompt=PROMPTS[:2]).backward()  # with bpe, the caption tokens' loss too
    assert all(parameter.grad is not None for parameter in model.parameters())
    model.eval().save_pretrained(tmp_path / "prior")
    loaded = Prior.from_pretrained(tmp_path / "prior")
    assert loaded.config.text_tokenizer == model.config.text_tokenizer
    assert torch.equal(loaded.sample(2, prompt=PROMPTS[:2], seed=1), model.sample(2, prompt=PROMPTS[:2], seed=1))


def test_prompt_errors(caption_tokenizer):
    model = text_prior("transformer", caption_tokenizer, caption_dropout=0.0)
    with pytest.raises(UserError, match="this prior is text-conditioned: pass a prompt"):
        model.sample(2, seed=0)
    with pytest.raises(UserError, match="prompt must be one string or 2 strings, got 3"):
        model.sample(2, prompt=PROMPTS, seed=0)
    with pytest.raises(UserError, match="a prompt is empty"):
        model.sample(1, prompt="  ", seed=0)
    with pytest.raises(UserError, match=r"prompt token ids must lie in \[0, 48\), got values in \[1, 999\]"):
        model.sample(1, prompt=torch.tensor([[1] + [999] * 11]), seed=0)
    with pytest.raises(UserError, match="prompt must be a string or a list of strings, got int"):
        model.sample(1, prompt=5, seed=0)
    codes = model.sample(2, prompt=PROMPTS[:2], seed=0)  # the other entry points take prompts too
    assert model.log_prob(codes, prompt=PROMPTS[:2]).shape == (2,)
    beams = model.beam_search(2, prompt=PROMPTS[:2], num_beams=2)
    assert torch.allclose(beams.log_prob, model.log_prob(beams.codes, prompt=PROMPTS[:2]))
    with pytest.raises(UserError, match="trained without caption dropout.*--caption-dropout 0.1"):
        model.sample(1, prompt=PROMPTS[0], seed=0, guidance_scale=2.0)
    plain = Prior.from_config(PriorConfig.build(arch="transformer", **ARCHS["transformer"].tiny, vocab_size=9,
                                                latent_shape=(2, 2)))
    with pytest.raises(UserError, match="this prior has no text conditioning: drop the prompt"):
        plain.sample(1, prompt=PROMPTS[0], seed=0)
    with pytest.raises(UserError, match="arch gated takes no text conditioning: use --arch maskgit, transformer or var, or pass --text-encoder none"):
        PriorConfig.build(arch="gated", text_encoder="transformer", text_tokenizer=caption_tokenizer)
    with pytest.raises(UserError, match="caption dropout and --text-encoder-path need a text-conditioned prior"):
        PriorConfig.build(arch="transformer", caption_dropout=0.1)


# ------------------------------------------------------------------------------------------------
# Training, the pipeline and the CLI
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """The text-to-image quickstart's fast run: a tiny tokenizer, captioned export and text prior on shapes, and
    their pipeline; its summary."""
    from pipelines.quickstart import quickstart

    root = tmp_path_factory.mktemp("shapes") / "qs"
    summary = quickstart(["--dataset", "shapes", "--fast", "--output-dir", str(root), "--no-progress"])
    (root / "summary.json").write_text(json.dumps(summary))
    return root


def test_quickstart_on_shapes(shapes_run):
    summary = json.loads((shapes_run / "summary.json").read_text())
    scores = summary["caption_accuracy"]
    assert scores["n_all"] == 72 and 0 <= scores["all"] <= 1 and scores["n_relation_heldout"] > 0
    assert Image.open(shapes_run / "samples.png").size[1] == 9 * (16 * 2 + 2)  # a row per prompt, tiles doubled


def test_training_on_captioned_codes(shapes_run, tmp_path, capsys):
    from stage2_prior.train import main

    prior = Prior.from_pretrained(shapes_run / "prior")
    assert prior.config.text_encoder == "transformer" and prior.config.caption_dropout == 0.1
    assert (shapes_run / "prior" / "samples" / "samples_00000020.png").is_file()
    code = main(["--codes", str(shapes_run / "codes"), "--output-dir", str(tmp_path / "gated"), "--max-steps", "1",
                 "--num-layers", "1", "--no-progress", "--text-encoder", "transformer"])
    assert code == 2 and "arch gated takes no text conditioning" in capsys.readouterr().err
    assert not (tmp_path / "gated").exists()
    code = main(["--codes", str(shapes_run / "codes"), "--output-dir", str(tmp_path / "bad"), "--arch", "transformer",
                 "--text-encoder-path", str(tmp_path), "--no-progress"])
    assert code == 2 and "is not a transformers model folder" in capsys.readouterr().err


def test_training_with_a_pretrained_text_encoder(shapes_run, caption_tokenizer, tmp_path):
    from stage2_prior.train import train

    folder = tiny_encoder_folder(tmp_path / "clip", "clip", caption_tokenizer)
    train(["--codes", str(shapes_run / "codes"), "--output-dir", str(tmp_path / "prior"), "--arch", "transformer",
           "--hidden-channels", "16", "--num-layers", "1", "--num-heads", "2", "--text-encoder-path", str(folder),
           "--text-length", "12", "--max-steps", "2", "--eval-every", "2", "--save-every", "2", "--sample-every", "2",
           "--no-progress"])
    prior = Prior.from_pretrained(tmp_path / "prior")
    assert (tmp_path / "prior" / "text_encoder" / "tokenizer.json").is_file() and prior.config.text_tokenizer is None
    assert prior.sample(2, prompt=PROMPTS[:2], seed=0).shape == (2, 4, 4)


def test_pipeline_prompts(shapes_run, tmp_path, capsys):
    from pipelines.generate import main
    from pipelines.pipeline import Pipeline

    pipeline = Pipeline.from_pretrained(shapes_run / "pipeline", device="cpu")
    batch = pipeline.generate(3, prompt=PROMPTS, seed=2, progress=False, guidance_scale=2.0, output_type="pt")
    # image k is a function of (seed, k) and its own prompt: drawn alone at index 2, the third image again
    shifted = pipeline.iter_generate(1, prompt=PROMPTS[2:], seed=2, first_index=2, progress=False,
                                     guidance_scale=2.0)
    assert torch.equal(next(shifted)[1], batch.codes[2:])
    images = batch.images * 2 - 1
    known = torch.zeros(3, *images.shape[2:], dtype=torch.bool)
    known[:, :8] = True  # the top rows kept, the rest drawn for each prompt
    completed = pipeline.complete(images, known, prompt=PROMPTS, seed=3)
    assert torch.equal(completed.codes[:, :2], pipeline.encode(images)[:, :2])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n")
    result = run_module("pipelines.generate", "--pipeline", str(shapes_run / "pipeline"), "--num-images", "2",
                        "--prompts-file", str(prompts), "--output-dir", str(tmp_path / "out"), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "prompts.json").read_text()) == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert np.load(tmp_path / "out" / "codes.npy").shape[0] == 4
    for flags, message in ((["--num-images", "1"], "this prior is text-conditioned: pass a prompt"),
                           (["--prompt", "x", "--prompts-file", str(prompts)], "not both"),
                           (["--prompts-file", str(tmp_path / "none.txt")], "does not exist")):
        code = main(["--pipeline", str(shapes_run / "pipeline"), *flags, "--output-dir", str(tmp_path / "bad"),
                     "--no-progress"])
        assert code == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()


def test_evaluate_prompts_a_text_pipeline_with_the_reference_captions(shapes_run, tmp_path, capsys):
    from pipelines.evaluate import evaluate, main as evaluate_main, reference_prompts
    from pipelines.features import train as train_features
    from pipelines.pipeline import Pipeline

    pipeline = Pipeline.from_pretrained(shapes_run / "pipeline", device="cpu")
    features = tmp_path / "features"
    train_features(["--dataset", "shapes", "--label-column", "objects", "--image-size",
                    str(pipeline.tokenizer.config.image_size), "--width", "8", "--batch-size", "16", "--max-steps", "2",
                    "--eval-every", "2", "--save-every", "2", "--warmup-steps", "1", "--output-dir", str(features),
                    "--no-progress"])
    flags = ["--pipeline", str(shapes_run / "pipeline"), "--dataset", "shapes", "--split", "test", "--features",
             str(features), "--num-images", "5", "--batch-size", "2", "--num-workers", "0", "--guidance-scale", "2",
             "--no-progress"]
    result = evaluate([*flags, "--npz", str(tmp_path / "samples.npz")])
    captions = shapes_split("test", 5)[1]
    # the samples are the pipeline's for the test captions in row order, whatever evaluate's batches
    expected = pipeline.generate(5, prompt=captions, seed=0, guidance_scale=2.0, progress=False, output_type="pt")
    pixels = expected.images.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(np.load(tmp_path / "samples.npz")["arr_0"], pixels)
    assert np.isfinite(result["fid"])
    assert result["protocol"]["prompts"] == "the reference's captions, in row order, 5 distinct"
    assert result["caption_accuracy"] == caption_accuracy(pixels, captions)
    assert evaluate_main([*flags, "--caption-column", "none"]) == 2
    assert "reads prompts and shapes [test] has no captions" in capsys.readouterr().err
    # a reference row without a caption is skipped with a warning, or refused with --strict-captions
    reference = SimpleNamespace(captions=np.array(["a small red circle", None, "a large green triangle"], dtype=object))
    assert reference_prompts(reference, 4, "set", strict=False) == ["a small red circle", "a large green triangle"] * 2
    assert "1 of the 3 rows of set have an empty or non-string caption" in capsys.readouterr().err
    with pytest.raises(UserError, match="1 of the 3 rows of set"):
        reference_prompts(reference, 4, "set", strict=True)


def test_bpe_caption_prefix_with_labels_and_a_code_map(caption_tokenizer):
    """DALL-E's arrangement with every other condition: exact over methods and batches, the caption tokens' loss
    weighted 1/8 against the codes' 7/8 in training (validation scores the codes alone), and the caption's cached
    keys (first block) those of the joint forward."""
    model = text_prior("transformer", caption_tokenizer, encoder="bpe", num_classes=3, label_dropout=0.1,
                       condition_vocab_size=4, condition_shape=(3, 2))
    labels, condition = torch.tensor([0, 2, 1]), torch.randint(0, 4, (3, 3, 2), generator=torch.Generator().manual_seed(3))
    reference = model.sample(3, labels=labels, condition=condition, prompt=PROMPTS, seed=4, guidance_scale=1.5)
    for method, window in (("naive", None), ("jacobi", None), ("jacobi", 5)):
        assert torch.equal(model.sample(3, labels=labels, condition=condition, prompt=PROMPTS, seed=4,
                                        guidance_scale=1.5, method=method, window=window), reference)
    alone = model.sample(1, labels=labels[2:], condition=condition[2:], prompt=PROMPTS[2], seed=4, sample_offset=2,
                         guidance_scale=1.5)
    assert torch.equal(alone, reference[2:])
    codes = torch.randint(0, 9, (3, 3, 4), generator=torch.Generator().manual_seed(5))
    context = model.context(labels, condition, 3, PROMPTS)
    conditioning = model.conditioning(context)
    image = model.head.nll(model.features(model.stacked(codes), conditioning).permute(0, 2, 3, 1),
                           model.stacked(codes)).mean()
    expected = 0.875 * image + 0.125 * model.text_nll(conditioning)
    assert torch.allclose(model.training_loss(codes, labels, condition, prompt=PROMPTS), expected)
    assert torch.allclose(model.nll(codes, labels, condition, prompt=PROMPTS), image)  # per code, as validation reads it
    state = model.start(3, conditioning)  # the caption's cached keys and values are the joint forward's
    tokens = model.caption_tokens(conditioning.text_ids)
    _, _, keys, _ = model.blocks[0].queries_keys_values(tokens, tokens.new_zeros(tokens.shape))
    assert torch.allclose(state.keys[0][:, :, :conditioning.text_ids.shape[1]], keys)


# ------------------------------------------------------------------------------------------------
# A pretrained text encoder from a local transformers folder (a tiny random one: nothing is downloaded)
# ------------------------------------------------------------------------------------------------

def tiny_encoder_folder(root, kind: str, caption_tokenizer):
    """A random tiny CLIP or T5 text encoder saved with a tokenizer (a BPE wrapped by transformers)."""
    import transformers
    from tokenizers import Tokenizer

    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(caption_tokenizer)),
                                                     pad_token="[PAD]", bos_token="[BOS]", unk_token="[UNK]")
    if kind == "clip":
        config = transformers.CLIPTextConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, max_position_embeddings=16,
                                             pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = transformers.CLIPTextModel(config)
    else:
        model = transformers.T5EncoderModel(transformers.T5Config(vocab_size=48, d_model=16, d_kv=8, d_ff=32,
                                                                  num_layers=1, num_heads=2))
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_pretrained_text_encoder_from_a_local_folder(kind, caption_tokenizer, tmp_path):
    folder = tiny_encoder_folder(tmp_path / kind, kind, caption_tokenizer)
    torch.manual_seed(0)
    model = Prior.from_config(PriorConfig.build(arch="transformer", **ARCHS["transformer"].tiny, vocab_size=9,
                                                latent_shape=(3, 4), dropout=0.0, text_encoder="transformer",
                                                text_encoder_path=str(folder), text_length=10,
                                                caption_dropout=0.1)).eval()
    frozen = {name: value.clone() for name, value in model.text_encoder.encoder.state_dict().items()}
    codes = torch.randint(0, 9, (2, 3, 4), generator=torch.Generator().manual_seed(1))
    model.train()
    model.nll(codes, prompt=PROMPTS[:2]).backward()
    assert model.text_encoder.projection.weight.grad is not None
    assert not any(name.startswith("text_encoder.encoder") for name in model.state_dict())
    model.eval()
    reference = model.sample(3, prompt=PROMPTS, seed=2, guidance_scale=2.0)
    assert torch.equal(model.sample(1, prompt=PROMPTS[2], seed=2, sample_offset=2, guidance_scale=2.0), reference[2:])
    assert torch.equal(model.sample(3, prompt=PROMPTS, seed=2, guidance_scale=2.0, method="naive"), reference)
    model.save_pretrained(tmp_path / "prior")
    saved = json.loads((tmp_path / "prior" / "config.json").read_text())
    assert saved["text_encoder_path"] == "text_encoder" and (tmp_path / "prior" / "text_encoder" / "config.json").is_file()
    import shutil

    shutil.rmtree(folder)  # the saved prior needs nothing outside its folder
    loaded = Prior.from_pretrained(tmp_path / "prior")
    assert all(torch.equal(value, loaded.text_encoder.encoder.state_dict()[name]) for name, value in frozen.items())
    assert torch.equal(loaded.sample(3, prompt=PROMPTS, seed=2, guidance_scale=2.0), reference)


def test_bad_text_encoder_folders(tmp_path, caption_tokenizer):
    from stage2_prior.pretrained_text import check_encoder_folder

    folder = tiny_encoder_folder(tmp_path / "clip", "clip", caption_tokenizer)
    with pytest.raises(UserError, match="--text-length 40 is longer than the text encoder .* reads \\(16 tokens\\)"):
        Prior.from_config(PriorConfig.build(arch="transformer", **ARCHS["transformer"].tiny, vocab_size=9,
                                            latent_shape=(2, 2), text_encoder="transformer",
                                            text_encoder_path=str(folder), text_length=40))

    with pytest.raises(UserError, match="is not a transformers model folder"):
        check_encoder_folder(tmp_path)
    import transformers

    transformers.GPT2Model(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=48)).save_pretrained(
        tmp_path / "gpt2")
    with pytest.raises(UserError, match="holds a 'gpt2' model, not a text encoder"):
        check_encoder_folder(tmp_path / "gpt2")
