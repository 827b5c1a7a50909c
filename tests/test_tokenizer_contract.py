"""The tokenizer contract, checked for every registered tokenizer class (Tokenizer.registry) in a few
configurations: the codes `encode` gives have the layout `code_layout` promises, at two image sizes;
decode(encode(x)) is the reconstruction; save/load round trip; `load_tokenizer` finds the class; export
writes the codes of the preprocessed images and the codes reader gets them, and the tokenizer, back.

A new tokenizer class joins by adding its configurations to CONFIGS (the first test fails until it does)."""
from __future__ import annotations

import pytest
import torch

from conftest import write_image_folder
from shared.codes import open_codes
from shared.data import DataConfig, load_split
from stage1_vqvae import PixelTokenizer, PixelTokenizerConfig, Tokenizer, VQVAEConfig, load_tokenizer
from stage1_vqvae.export import export
from stage1_vqvae.tokenizer import tokenizer_for_codes

TINY_VQVAE = dict(image_size=8, hidden_channels=8, latent_channels=4, num_res_blocks=1, codebook_size=8,
                  num_downsamples=1)
CONFIGS = {
    "VQVAE": [VQVAEConfig(**TINY_VQVAE), VQVAEConfig(**TINY_VQVAE, levels=2),
              VQVAEConfig(**TINY_VQVAE, quantizer="rvq", num_quantizers=2, in_channels=3),
              VQVAEConfig(**{**TINY_VQVAE, "codebook_size": 16}, quantizer="fsq", fsq_levels=(4, 4)),
              VQVAEConfig(**TINY_VQVAE, quantizer="multiscale", scales=(1, 2, 4))],
    "PixelTokenizer": [PixelTokenizerConfig(levels=16, channels=3, image_size=8),
                       PixelTokenizerConfig(levels=4, channels=1, image_size=8)],
}
CASES = [pytest.param(name, index, id=f"{name}-{index}") for name, configs in CONFIGS.items()
         for index in range(len(configs))]


def test_every_registered_tokenizer_is_checked():
    assert set(Tokenizer.registry) == set(CONFIGS)


def build(name: str, index: int) -> Tokenizer:
    torch.manual_seed(0)
    tokenizer = Tokenizer.registry[name](CONFIGS[name][index])
    images = torch.rand(6, tokenizer.config.in_channels, 8, 8) * 2 - 1
    tokenizer.train()
    with torch.no_grad():
        tokenizer(images)  # k-means initialises any codebook
    return tokenizer.eval()


def levels_of(codes) -> dict:
    return codes if isinstance(codes, dict) else {"codes": codes}


@pytest.mark.parametrize("name, index", CASES)
def test_codes_have_the_promised_layout_and_decode_to_the_reconstruction(name, index):
    tokenizer = build(name, index)
    channels = tokenizer.config.in_channels
    if tokenizer.scales is not None:  # a pyramid's scales are fixed for its training size
        with pytest.raises(ValueError, match="scales are fixed for 8px images"):
            tokenizer.code_layout(16)
    for size in (8, 16) if tokenizer.scales is None else (8,):  # the training size and a larger one
        images = torch.rand(3, channels, size, size) * 2 - 1
        codes = levels_of(tokenizer.encode(images))
        layout = tokenizer.code_layout(size)
        assert list(codes) == [level.name for level in layout]  # generation order
        for level in layout:
            grid = codes[level.name]
            assert grid.dtype == torch.int64 and tuple(grid.shape) == (3, *level.grid_shape)
            assert 0 <= int(grid.min()) and int(grid.max()) < level.vocab_size
        with torch.no_grad():
            decoded = tokenizer.decode(tokenizer.encode(images))
            assert decoded.shape == images.shape and decoded.abs().max() <= 1
            assert torch.allclose(decoded, tokenizer(images).reconstruction, atol=1e-5)
    assert tokenizer.level_shapes == {level.name: level.grid_shape for level in tokenizer.code_layout()}


@pytest.mark.parametrize("name, index", CASES)
def test_save_load_round_trip(name, index, tmp_path):
    tokenizer = build(name, index)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    loaded = load_tokenizer(tmp_path / "tokenizer")
    assert type(loaded) is type(tokenizer) and loaded.config == tokenizer.config
    images = torch.rand(2, tokenizer.config.in_channels, 8, 8) * 2 - 1
    codes = tokenizer.encode(images)
    assert all(torch.equal(a, b) for a, b in zip(levels_of(loaded.encode(images)).values(), levels_of(codes).values()))
    with torch.no_grad():
        assert torch.equal(loaded.decode(codes), tokenizer.decode(codes))
    assert loaded.weights_sha256() == tokenizer.weights_sha256()


@pytest.mark.parametrize("name, index", CASES)
def test_export_writes_the_codes_and_the_reader_finds_the_tokenizer(name, index, tmp_path):
    tokenizer = build(name, index)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    mode = "RGB" if tokenizer.config.in_channels == 3 else "L"
    folder = write_image_folder(tmp_path / "images", {"a": 3, "b": 2}, size=(10, 12), mode=mode)
    export(["--tokenizer", str(tmp_path / "tokenizer"), "--dataset", str(folder), "--output", str(tmp_path / "codes"),
            "--image-size", "8", "--no-progress"])
    dataset, metadata = open_codes(tmp_path / "codes")
    assert metadata.tokenizer_class == name and metadata.levels == tokenizer.code_layout(8)
    assert metadata.scales == tokenizer.scales  # a pyramid's export names its scales
    images = torch.stack([image for image, _ in load_split(DataConfig(dataset=str(folder), image_size=8))])
    expected = levels_of(tokenizer.encode(images))
    for level in metadata.levels:
        stored = dataset.level_view(level.name)[:][0]
        assert torch.equal(stored.long(), expected[level.name])
    found = tokenizer_for_codes(metadata)
    assert type(found) is type(tokenizer) and found.weights_sha256() == tokenizer.weights_sha256()


def test_an_unknown_quantizer_lists_the_registered_ones():
    with pytest.raises(ValueError, match="unknown quantizer 'vqq'; registered quantizers: vq, fsq, simvq, lfq, rvq, "
                                         "multiscale"):
        VQVAEConfig(quantizer="vqq")


def test_a_shortcut_builds_a_tokenizer_without_a_folder():
    tokenizer = load_tokenizer("pixels:16", channels=3, image_size=8)
    assert type(tokenizer) is PixelTokenizer and tokenizer.config.levels == 16


@pytest.mark.parametrize("scales, message", [((1, 3, 2, 4), "must be increasing"), ((1, 2), "must end at the latent "
                                             "side 4"), ((0, 4), "must be increasing positive")])
def test_bad_scales_get_one_line_errors(scales, message):
    with pytest.raises(ValueError, match=message) as error:
        VQVAEConfig(**TINY_VQVAE, quantizer="multiscale", scales=scales)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="--scales is a setting of --quantizer multiscale"):
        VQVAEConfig(**TINY_VQVAE, scales=(1, 2, 4))


@pytest.mark.parametrize("extra, message", [(dict(use_cosine_sim=True), "drop --use-cosine-sim"),
                                            (dict(codebook_dim=2), "drop --codebook-dim 2")])
def test_a_multiscale_quantizer_keeps_its_codes_in_the_latent_space(extra, message):
    """Residuals are added back at full length: cosine or lower-dimensional codes would lose them."""
    with pytest.raises(ValueError, match=message):
        VQVAEConfig(**TINY_VQVAE, quantizer="multiscale", scales=(1, 2, 4), **extra)


def test_the_multiscale_quantizer_is_vars_residual_pyramid():
    """Each scale quantizes what the coarser ones left: f_hat after scale k is sum of phi(up(z_j)), j <= k, and the
    codes of scale k are the nearest codes to the area-downsampled residual f - f_hat_(k-1) (VAR Algorithm 1)."""
    import torch.nn.functional as F

    tokenizer = build("VQVAE", 4)
    quantizer = tokenizer.quantizer
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        latents = tokenizer.encoder(images)  # (3, D, 4, 4)
        codes = tokenizer.encode(images)
        codebook = quantizer.codebook.codebook  # (V, D)
        f_hat = torch.zeros_like(latents)
        for index, side in enumerate(quantizer.scales):
            residual = F.interpolate(latents - f_hat, size=(side, side), mode="area")  # (3, D, s, s)
            distances = torch.cdist(residual.permute(0, 2, 3, 1).reshape(-1, residual.shape[1]), codebook)
            assert torch.equal(codes[f"scale_{side}"].flatten(), distances.argmin(1))
            f_hat = f_hat + quantizer.refined(index, quantizer.vectors(codes[f"scale_{side}"]), 4)
        assert torch.allclose(quantizer.latents_from_codes(codes), f_hat, atol=1e-6)
