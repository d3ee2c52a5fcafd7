"""Latent-space applications: flat latents round-trip, interpolation ends at both images, attribute edits."""

from __future__ import annotations

import pytest
import torch

from fastflow.latent import attribute_direction, decode_flat, encode_flat, interpolate, manipulate
from fastflow.models import Glow
from tests.helpers import perturb_parameters

N_BINS = 16


@pytest.fixture(scope="module")
def model() -> Glow:
    torch.manual_seed(0)
    model = Glow(3, 4, levels=2, steps=2, hidden=8, n_bins=N_BINS).train()
    model.log_prob(torch.rand(8, 3, 4, 4) - 0.5)  # ActNorm initialisation
    perturb_parameters(model)
    return model.eval()


def _levels(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, N_BINS, (n, 3, 4, 4), generator=torch.Generator().manual_seed(seed))


def _pixels(levels: torch.Tensor) -> torch.Tensor:
    return (levels.float() + 0.5) / N_BINS - 0.5


def test_flat_latents_concatenate_every_split_and_decode_back(model):
    z, shapes = encode_flat(model, _levels(5, 0), batch=2)
    assert z.shape == (5, 3 * 4 * 4) and len(shapes) == 2
    torch.testing.assert_close(decode_flat(model, z, shapes), _pixels(_levels(5, 0)), rtol=0, atol=1e-4)


def test_interpolation_runs_from_the_first_image_to_the_second(model):
    a, b = _levels(1, 1), _levels(1, 2)
    strip = interpolate(model, a, b, steps=5)
    assert strip.shape == (5, 3, 4, 4)
    torch.testing.assert_close(strip[0], _pixels(a)[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(strip[-1], _pixels(b)[0], rtol=0, atol=1e-4)
    z, shapes = encode_flat(model, torch.cat([a, b]))
    torch.testing.assert_close(strip[2:3], decode_flat(model, z.mean(0, keepdim=True), shapes), rtol=0, atol=1e-5)


def test_attribute_direction_is_the_difference_of_mean_latents(model):
    with_attr, without = _levels(4, 3), _levels(6, 4)
    direction = attribute_direction(model, with_attr, without)
    expected = encode_flat(model, with_attr)[0].mean(0) - encode_flat(model, without)[0].mean(0)
    torch.testing.assert_close(direction, expected)
    image = _levels(1, 5)
    edited = manipulate(model, image, direction, [-1.0, 0.0, 1.0])
    assert edited.shape == (3, 3, 4, 4)
    torch.testing.assert_close(edited[1], _pixels(image)[0], rtol=0, atol=1e-4)
    z, shapes = encode_flat(model, image)
    torch.testing.assert_close(edited[2:], decode_flat(model, z + direction, shapes), rtol=0, atol=1e-5)


def test_bad_arguments_are_refused(model):
    with pytest.raises(ValueError, match="steps must be >= 2"):
        interpolate(model, _levels(1, 0), _levels(1, 1), steps=1)
    with pytest.raises(ValueError, match="a must hold one image"):
        interpolate(model, _levels(2, 0), _levels(1, 1))
    with pytest.raises(ValueError, match=r"levels must be integer pixel levels of shape \(N, 3, 4, 4\)"):
        encode_flat(model, torch.zeros(1, 1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"direction must have shape \(48,\)"):
        manipulate(model, _levels(1, 0), torch.zeros(3), [1.0])
