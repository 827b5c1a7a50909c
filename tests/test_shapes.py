"""The built-in captioned `shapes`: deterministic splits with held-out compositions, the checker (its accuracy on
real images, its refusals and their reasons), caption accuracy by kind of prompt, the `objects` label, and
captions bound otherwise (binding gains)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.captions import binding_gains, caption_accuracy, held_out_pairs, prompt_kind, refusals
from shared.data import DataConfig, open_source
from shared.data.images import resize_and_centre_crop
from shared.data.shapes import (COLOURS, MISMATCHES, OBJECT_SETS, OPPOSITES, SWAPS, caption_matches, caption_of,
                                mismatch, objects_label, parse_caption, shapes_split, swapped)
from shared.errors import UserError
from stage2_prior import ARCHS, Prior, PriorConfig
from stage2_prior.text import train_text_tokenizer


def test_shapes_checker_accepts_real_images_and_refuses_wrong_captions():
    images, captions = shapes_split("heldout")
    small = [resize_and_centre_crop(Image.fromarray(image), 32).transpose(1, 2, 0) for image in images]
    for pictures in (images, small):  # 64x64 as generated, and 32x32 as the quickstart reads them
        assert np.mean([caption_matches(image, caption) for image, caption in zip(pictures, captions)]) > 0.98
    shifted = captions[1:] + captions[:1]  # each image with another image's caption
    assert np.mean([caption_matches(image, caption) for image, caption in zip(small, shifted)]) < 0.04  # 3.5%
    # a relation reversed, on two-object images, is refused
    two = [(image, caption) for image, caption in zip(small, captions) if parse_caption(caption)[1]]
    for old, new in OPPOSITES.items():
        refused = [not caption_matches(image, caption.replace(old, new)) for image, caption in two if old in caption]
        assert np.mean(refused) > 0.9, old  # 94.8% over the four relations: two alike fit either way


def test_shapes_splits_are_deterministic_and_held_out_compositions_never_train():
    images, captions = shapes_split("train", 400)
    again, _ = shapes_split("train", 400)
    assert all(np.array_equal(a, b) for a, b in zip(images, again))
    assert not any(held_out_pairs(caption) for caption in captions)
    assert all(held_out_pairs(caption) for caption in shapes_split("heldout", 200)[1])
    assert {prompt_kind(caption) for caption in captions} == {"single", "relation"}


def test_the_objects_label_names_colours_and_shapes_whatever_their_order():
    assert len(OBJECT_SETS) == 90 and len(set(OBJECT_SETS)) == 90  # 12 single pairs, 78 unordered two
    mixed = objects_label("a small red circle left of a large blue square")
    assert OBJECT_SETS[mixed] == "red circle and blue square"
    assert mixed == objects_label("a large blue square right of a small red circle")
    assert objects_label("a large red circle above a small red circle") != objects_label("a small red circle")
    source = open_source(DataConfig(dataset="shapes", label_column="objects"))
    assert source.label_names == OBJECT_SETS
    assert source.rows("test").labels.tolist() == [objects_label(caption) for caption in shapes_split("test")[1]]
    assert open_source(DataConfig(dataset="shapes")).label_column is None  # unlabelled unless asked
    with pytest.raises(UserError, match="one label column, 'objects'"):
        open_source(DataConfig(dataset="shapes", label_column="label"))


def test_the_checker_says_why_it_refuses():
    images, captions = shapes_split("test", 100)

    def unlike(caption: str) -> bool:  # two things that differ in size, colour and shape
        things, relation = parse_caption(caption)
        return relation is not None and all(getattr(things[0], key) != getattr(things[1], key)
                                            for key in ("size", "colour", "shape"))

    image, caption = next((image, caption) for image, caption in zip(images, captions) if unlike(caption))
    (first, second), relation = parse_caption(caption)
    cases = {caption: None, caption_of([first], None): "count",
             swapped(caption, "colour"): "shape",  # each colour on the other's shape
             caption_of([dataclasses.replace(first, size=second.size), second], relation): "size",
             swapped(caption, "relation"): "relation"}
    spare = next(colour for colour in COLOURS if colour not in (first.colour, second.colour))
    cases[caption_of([dataclasses.replace(first, colour=spare), second], relation)] = "colour"
    for text, reason in cases.items():
        assert mismatch(image, text) == reason, text
        assert caption_matches(image, text) == (reason is None)
    counts = refusals(np.stack([image] * len(cases)), list(cases))  # per kind of prompt (a swap may be held out)
    totals = {reason: sum(kind[reason] for kind in counts.values()) for reason in MISMATCHES}
    assert totals == dict.fromkeys(MISMATCHES, 1)
    assert counts[prompt_kind(caption_of([first], None))]["count"] == 1


def test_caption_accuracy_by_kind():
    images, captions = shapes_split("heldout", 40)
    scores = caption_accuracy(np.stack(images), captions)
    assert scores["all"] == 1.0 and scores["n_all"] == 40
    assert scores["n_single_heldout"] + scores["n_relation_heldout"] == 40


def test_swapped_captions_bind_the_same_words_otherwise():
    caption = "a small red circle left of a large blue square"
    assert [swapped(caption, swap) for swap in SWAPS] == [
        "a small blue circle left of a large red square", "a small red square left of a large blue circle",
        "a large red circle left of a small blue square", "a small red circle right of a large blue square"]
    assert swapped("a small red circle above a large red square", "colour") is None  # nothing to exchange
    assert swapped("a small red circle above a small red circle", "relation") is None  # says the same
    assert swapped("a small red circle", "relation") is None
    with pytest.raises(ValueError, match="swap must be one of colour"):
        swapped(caption, "color")


def test_binding_gains_against_log_prob_and_for_a_prior_that_reads_a_bag_of_words():
    captions = [caption for caption in shapes_split("test", 40)[1] if parse_caption(caption)[1] is not None][:6]
    captions.append("a small blue circle above a large green triangle")  # swapping shapes names held-out pairs
    torch.manual_seed(0)
    config = PriorConfig.build(arch="transformer", **{**ARCHS["transformer"].tiny, "vocab_size": 9,
                               "latent_shape": (3, 4), "dropout": 0.0, "text_encoder": "transformer",
                               "text_tokenizer": train_text_tokenizer(shapes_split("train", 300)[1], 80),
                               "text_length": 32, "text_layers": 1})
    model = Prior.from_config(config).double().eval()
    for parameter in model.parameters():
        parameter.data.normal_(0, 0.4)
    codes = torch.randint(0, 9, (len(captions), 3, 4), generator=torch.Generator().manual_seed(1))
    gains = binding_gains(model, codes, captions)
    rows = [row for row, caption in enumerate(captions[:-1]) if swapped(caption, "shape") is not None]
    by_hand = (model.log_prob(codes[rows], prompt=[captions[row] for row in rows])
               - model.log_prob(codes[rows], prompt=[swapped(captions[row], "shape") for row in rows]))  # (n,)
    assert gains["n_shape"] == len(rows) and gains["shape"] == pytest.approx(by_hand.mean().item())
    assert gains["shape_wins"] == pytest.approx((by_hand > 0).double().mean().item())
    assert all(gains[f"n_{swap}"] > 0 and abs(gains[swap]) > 1e-3 for swap in SWAPS)  # word order reaches it
    model.text_encoder.positions.data.zero_()  # no positions: the caption is a set of words
    gains = binding_gains(model, codes, captions)
    assert all(abs(gains[swap]) < 1e-9 and gains[f"{swap}_wins"] == 0.5 for swap in ("colour", "shape", "size"))
    assert abs(gains["relation"]) > 1e-3  # "left" against "right": other words
