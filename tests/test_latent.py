"""Latent-space applications: flat latents round-trip, interpolation ends at both images, attribute edits."""

from __future__ import annotations

import copy

import pytest
import torch

from fastflow.latent import attribute_direction, decode_flat, encode_flat, interpolate, manipulate
from fastflow.models import Glow, TabularFlow
from fastflow.models.base import eval_mode
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
    with pytest.raises(ValueError, match=r"levels must have shape \(N, 3, 4, 4\) with N >= 1"):
        encode_flat(model, torch.zeros(1, 1, 4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="levels must be an integer tensor"):
        encode_flat(model, _pixels(_levels(1, 0)))
    with pytest.raises(ValueError, match=r"direction must have shape \(48,\)"):
        manipulate(model, _levels(1, 0), torch.zeros(3), [1.0])
    with pytest.raises(ValueError, match="direction holds NaN/Inf"):
        manipulate(model, _levels(1, 0), torch.full((48,), float("nan")), [1.0])
    out_of_range = _levels(1, 0)
    out_of_range[0, 0, 0, 0] = N_BINS + 3
    with pytest.raises(ValueError, match=r"image must lie in \[0, n_bins\) = \[0, 16\), got values in \[\d+, 19\]"):
        manipulate(model, out_of_range, torch.zeros(48), [1.0])
    with pytest.raises(
        ValueError, match=r"with_attribute must have shape \(N, 3, 4, 4\) with N >= 1, got \(0, 3, 4, 4\)"
    ):
        attribute_direction(model, _levels(0, 0), _levels(2, 1))
    for strengths in ([], [[1.0, 2.0], [3.0, 4.0]], [1.0, float("nan")]):  # a 2-D list was flattened silently
        with pytest.raises(ValueError, match="strengths must be a non-empty 1-D sequence of finite numbers"):
            manipulate(model, _levels(1, 0), torch.zeros(48), strengths)
    with pytest.raises(TypeError, match="strengths must be a sequence of numbers"):
        manipulate(model, _levels(1, 0), torch.zeros(48), "ab")
    with pytest.raises(TypeError, match="steps must be an int"):
        interpolate(model, _levels(1, 0), _levels(1, 1), steps=3.0)
    with pytest.raises(TypeError, match="direction must be a floating-point torch.Tensor, got list"):
        manipulate(model, _levels(1, 0), [0.0] * 48, [1.0])
    with pytest.raises(ValueError, match=r"image must have shape \(N, 3, 4, 4\)"):
        manipulate(model, torch.tensor(3), torch.zeros(48), [1.0])  # 0-d: was len() of a 0-d tensor
    with pytest.raises(ValueError, match="context was given but Glow is unconditional"):
        interpolate(model, _levels(1, 0), _levels(1, 1), context=torch.tensor([1]))
    with pytest.raises(ValueError, match="has no n_bins"):
        encode_flat(TabularFlow(4), torch.zeros(1, 4, dtype=torch.long))


def test_a_class_conditional_model_interpolates_and_edits_at_one_label():
    torch.manual_seed(0)
    model = Glow(3, 4, levels=2, steps=2, hidden=8, n_bins=N_BINS, num_classes=3).train()
    model.log_prob(torch.rand(8, 3, 4, 4) - 0.5, torch.arange(8) % 3)  # ActNorm initialisation
    perturb_parameters(model)
    model.eval()
    a, b, label = _levels(1, 1), _levels(1, 2), torch.tensor([2])
    with pytest.raises(ValueError, match="context"):
        interpolate(model, a, b)  # a class-conditional model needs its label
    strip = interpolate(model, a, b, steps=3, context=label)
    torch.testing.assert_close(strip[0], _pixels(a)[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(strip[-1], _pixels(b)[0], rtol=0, atol=1e-4)
    z, shapes = encode_flat(model, torch.cat([a, b]), context=label.expand(2))
    middle = decode_flat(model, z.mean(0, keepdim=True), shapes, label)
    torch.testing.assert_close(strip[1:2], middle, rtol=0, atol=1e-5)
    direction = attribute_direction(model, _levels(2, 3), _levels(2, 4), torch.tensor([0, 1]), torch.tensor([2, 2]))
    edited = manipulate(model, a, direction, [0.0, 1.0], context=label)
    torch.testing.assert_close(edited[0], _pixels(a)[0], rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match=r"context must have one row per image \(1\)"):
        manipulate(model, a, direction, [1.0], context=torch.tensor([0, 1]))
    # the direction's two contexts are named apart
    with pytest.raises(ValueError, match=r"context_without must have one row per image \(2\), got shape \(1,\)"):
        attribute_direction(model, _levels(2, 3), _levels(2, 4), torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="context_without is required: Glow is conditional"):
        attribute_direction(model, _levels(2, 3), _levels(2, 4), torch.tensor([0, 1]))


def test_decode_flat_names_z_and_takes_shapes_read_back_as_lists(model):
    """A float64 z was blamed on latents[-1] (an internal list), and shapes that went through JSON (lists of
    ints) failed with an AttributeError."""
    z, shapes = encode_flat(model, _levels(2, 5))
    as_lists = [list(s) for s in shapes]
    torch.testing.assert_close(decode_flat(model, z, as_lists), decode_flat(model, z, shapes), rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"z is torch.float64 but the model is torch.float32"):
        decode_flat(model, z.double(), shapes)
    with pytest.raises(TypeError, match="shapes must be a sequence of shapes"):
        decode_flat(model, z, [3.5])


def test_strengths_may_be_a_tensor_and_the_model_keeps_its_mode_and_dtype(model):
    image = _levels(1, 5)
    direction = torch.randn(48, generator=torch.Generator().manual_seed(0))
    from_list = manipulate(model, image, direction, [0.0, 1.0])
    torch.testing.assert_close(manipulate(model, image, direction, torch.tensor([0.0, 1.0])), from_list)
    z, shapes = encode_flat(model, image)  # each row is the latent moved by its own strength
    torch.testing.assert_close(from_list, decode_flat(model, z + torch.tensor([[0.0], [1.0]]) * direction, shapes))
    assert not torch.equal(from_list[0], from_list[1])
    model.train()
    try:
        interpolate(model, _levels(1, 1), _levels(1, 2), steps=3)
        assert model.training, "the latent API left the model in eval mode"
    finally:
        model.eval()
    double = copy.deepcopy(model).double()
    strip = interpolate(double, _levels(1, 1), _levels(1, 2), steps=3)
    assert strip.dtype == torch.float64
    torch.testing.assert_close(strip[0], _pixels(_levels(1, 1))[0].double(), rtol=0, atol=1e-9)


def test_a_bfloat16_model_sees_the_bin_centres_of_high_levels():
    """``(k + 0.5)`` was computed in the model's dtype: in bfloat16 level 255 became 0.5 (outside ``[-0.5, 0.5)``)
    and every level from 128 up a bin edge; the centres themselves are exact in bfloat16."""
    model = Glow(3, 4, levels=1, steps=1, hidden=8).to(torch.bfloat16).eval()
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    levels = torch.tensor([255, 200, 129, 0]).repeat(12).reshape(1, 3, 4, 4)
    encode_flat(model, levels)
    centres = ((levels.double() + 0.5) / 256 - 0.5).to(torch.bfloat16)
    assert torch.equal(seen[0], centres) and float(seen[0].max()) < 0.5


def test_every_module_keeps_its_own_mode(model):
    """The mode was put back as the model's alone: a block left in eval mode under a training model came back
    training (and an ActNorm in train mode initialises from the next batch)."""
    mixed = copy.deepcopy(model).train()
    mixed.blocks[0].eval()
    modes = {name: module.training for name, module in mixed.named_modules()}
    interpolate(mixed, _levels(1, 1), _levels(1, 2), 3)
    encode_flat(mixed, _levels(2, 3))
    assert {name: module.training for name, module in mixed.named_modules()} == modes
    shared = torch.nn.Linear(1, 1).eval()  # under a module in eval mode, then one in train mode
    root = torch.nn.ModuleDict({"a": torch.nn.Sequential(shared).eval(), "b": torch.nn.Sequential(shared).train()})
    shared.eval()
    with eval_mode(root):
        pass
    assert not shared.training and not root["a"].training and root["b"].training

    class Cached(torch.nn.Linear):  # a train() of its own: a cache kept in eval mode, dropped in training
        def train(self, mode: bool = True) -> Cached:
            self.cache = None if mode else self.weight.detach().clone()
            return super().train(mode)

    layer = Cached(1, 1).train()
    with eval_mode(layer):
        assert layer.cache is not None
    assert layer.training and layer.cache is None


def test_bad_class_labels_are_named_by_their_argument():
    torch.manual_seed(0)
    conditional = Glow(3, 4, levels=2, steps=1, hidden=8, n_bins=N_BINS, num_classes=4).eval()
    good = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"context_without \(class labels\) must be in \[0, 4\)"):
        attribute_direction(conditional, _levels(4, 1), _levels(4, 2), good, torch.tensor([0, 1, 2, 9]))
    with pytest.raises(TypeError, match=r"context_with \(class labels\) must be int32 or int64"):
        attribute_direction(conditional, _levels(4, 1), _levels(4, 2), good.float(), good)
    with pytest.raises(ValueError, match=r"context_with \(class labels\) must be integer labels of shape"):
        attribute_direction(conditional, _levels(4, 1), _levels(4, 2), good.view(4, 1), good)
