"""Embedded data: quantization, photo crops with a disjoint held-out strip, image specs for trained models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastflow.data import (
    DIGITS_N_BINS,
    TensorImages,
    batch_at_step,
    digits_of_class,
    load_digits,
    load_image_spec,
    load_photo_crops,
    load_photos,
    quantize,
    split_heldout,
)


def test_quantize_keeps_the_top_bits():
    pixels = torch.arange(256, dtype=torch.uint8)
    torch.testing.assert_close(quantize(pixels, 32), pixels >> 3)
    assert quantize(pixels, DIGITS_N_BINS).max() == DIGITS_N_BINS - 1


def test_quantize_gives_uint8_levels_equal_to_the_int64_formula(monkeypatch):
    """Levels were int64: 8 times the uint8 images resident, about 16 times at the peak."""
    pixels = torch.arange(256, dtype=torch.uint8)
    for n_bins in range(2, 257):
        levels = quantize(pixels, n_bins)
        assert levels.dtype == torch.uint8
        assert torch.equal(levels.long(), pixels.long() * n_bins // 256), n_bins
    monkeypatch.setattr("fastflow.data.QUANTIZE_CHUNK", 7)  # chunk edges inside rows, a ragged last chunk
    images = torch.randint(0, 256, (5, 3, 6, 9), dtype=torch.uint8).transpose(2, 3)  # not contiguous
    for n_bins in (17, 32, 255):
        levels = quantize(images, n_bins)
        assert levels.dtype == torch.uint8 and levels.shape == images.shape
        assert torch.equal(levels.long(), images.long() * n_bins // 256)


def test_the_embedded_data_is_uint8_levels():
    assert load_digits()[0].dtype == torch.uint8 and digits_of_class(3).dtype == torch.uint8
    train, heldout = load_photo_crops(16, 32, heldout_crops=1)
    assert train.draw(2, torch.Generator().manual_seed(0))[0].dtype == torch.uint8
    assert heldout.levels.dtype == torch.uint8


def test_photo_crops_come_from_the_training_part_and_heldout_from_the_strip():
    train, heldout = load_photo_crops(16, 32, heldout_crops=4)
    photos = [quantize(p, 32) for p in load_photos()]
    width = photos[0].shape[2]
    assert [p.shape[2] for p in train.photos] == [width - round(width / 6)] * 2
    levels, labels = train.draw(5, torch.Generator().manual_seed(0))
    assert levels.shape == (5, 3, 16, 16) and labels is None
    assert heldout.levels.shape == (8, 3, 16, 16) and int(heldout.levels.max()) < 32
    with pytest.raises(ValueError, match="^resolution must be in"):
        load_photo_crops(400, 32)


def test_split_keeps_at_least_one_image_on_each_side():
    train, test = split_heldout(2)
    assert len(train) == 1 and len(test) == 1
    assert sorted(torch.cat([train, test]).tolist()) == [0, 1]
    with pytest.raises(ValueError, match="at least 2"):
        split_heldout(1)


def test_image_specs_resolve_embedded_images_and_files(tmp_path):
    torch.testing.assert_close(load_image_spec("digits:3", (1, 8, 8), 17), load_digits()[2][3:4])
    Image.fromarray(np.full((10, 12, 3), 255, dtype=np.uint8)).save(tmp_path / "white.png")
    assert torch.all(load_image_spec(str(tmp_path / "white.png"), (3, 8, 8), 4) == 3)
    with pytest.raises(ValueError, match=r"digits:3 is a 1x8x8 image with 17 levels.*3x8x8 images with 4"):
        load_image_spec("digits:3", (3, 8, 8), 4)
    with pytest.raises(ValueError, match="digits:9999: there are 270 held-out digits"):
        load_image_spec("digits:9999", (1, 8, 8), 17)
    with pytest.raises(ValueError, match="white.png.*3 channel"):
        load_image_spec(str(tmp_path / "white.png"), (1, 8, 8), 17)
    with pytest.raises(ValueError, match=r"white.png: an image file is cropped square.*\(8, 16\)"):
        load_image_spec(str(tmp_path / "white.png"), (3, 8, 16), 4)  # was an (8, 8) image for an 8x16 model
    with pytest.raises(ValueError, match="photos:0: the model's images are 512 pixels wide: resolution must be"):
        load_image_spec("photos:0", (3, 512, 512), 32)  # named --resolution, a flag interpolate does not have


def test_digits_of_a_class():
    sevens = digits_of_class(7)
    levels, labels, _, _ = load_digits()
    assert len(sevens) == int((labels == 7).sum()) > 0
    with pytest.raises(ValueError, match="digit label"):
        digits_of_class(10)
    with pytest.raises(TypeError, match="digit label must be an int"):
        digits_of_class(3.5)  # was an empty tensor


def test_data_values_that_would_pass_as_something_else_are_refused():
    with pytest.raises(TypeError, match="n_bins must be an int"):
        quantize(torch.zeros(2, dtype=torch.uint8), 16.5)  # gave float levels
    with pytest.raises(ValueError, match="levels must be a non-empty integer tensor"):
        TensorImages(torch.zeros(2, 1, 2, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="labels must be integer class labels"):
        TensorImages(torch.zeros(2, 1, 2, 2, dtype=torch.long), torch.tensor([0.0, 1.0]))


def test_a_sixteen_bit_image_spec_keeps_its_grey_level(tmp_path):
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(tmp_path / "grey16.png")
    assert torch.all(load_image_spec(str(tmp_path / "grey16.png"), (1, 8, 8), 4) == 2), "mid-grey, not white"


def test_batches_and_held_out_evaluation_reseed_no_global_generator(monkeypatch):
    """The batch of a step and the held-out dequantization draw from generators of their own: seeding the global
    one (torch.manual_seed also seeds every CUDA generator, which fork_rng(devices=[]) would not restore) would
    clobber the caller's random streams."""
    from fastflow.models import Glow
    from fastflow.train import evaluate_bits_per_dim

    levels = torch.randint(0, 4, (6, 1, 4, 4))
    model = Glow(1, 4, levels=1, steps=1, hidden=4, n_bins=4)

    def refused(*args, **kwargs):
        raise AssertionError("the global RNG was reseeded")

    monkeypatch.setattr(torch, "manual_seed", refused)
    x, _ = batch_at_step(TensorImages(levels), 3, 4, 4, seed=1)
    again, _ = batch_at_step(TensorImages(levels), 3, 4, 4, seed=1)
    assert torch.equal(x, again) and x.shape == (4, 1, 4, 4)
    assert evaluate_bits_per_dim(model, levels) == evaluate_bits_per_dim(model, levels)
