"""Tiled coupling networks: exact at tile borders, same loss and gradients as untiled reversible backprop."""

from __future__ import annotations

import pytest
import torch

from fastflow.models import Glow, Jet, RealNVP
from fastflow.nn import AffineCoupling
from fastflow.nn.tiling import ACTIVE_HIDDEN_TENSORS, HALO, Tiling, choose_tile_size, tiles
from tests.helpers import HaloConv, loss_and_grads, perturb_parameters


@pytest.mark.parametrize("height, width, side", [(7, 9, 3), (5, 5, 1), (8, 6, 4), (3, 11, 16)])
def test_tiles_cover_the_image_once_with_clipped_halo(height, width, side):
    covered = torch.zeros(height, width, dtype=torch.int64)
    for tile in tiles(height, width, side):
        covered[tile.core] += 1
        assert tile.hh0 == max(tile.h0 - HALO, 0) and tile.hh1 == min(tile.h1 + HALO, height)
        assert tile.ww0 == max(tile.w0 - HALO, 0) and tile.ww1 == min(tile.w1 + HALO, width)
    assert (covered == 1).all()


@pytest.mark.parametrize("mask, scale", [("channel", "sigmoid"), ("checkerboard", "exp")])
@pytest.mark.parametrize("side", [1, 2, 3, 5])
def test_tiled_network_outputs_are_exact(mask, scale, side):
    layer = AffineCoupling(5, hidden=8, scale=scale, mask=mask)
    perturb_parameters(layer, 0.3)
    x = torch.randn(2, 5, 7, 9)
    with torch.no_grad():
        y_full, logdet_full = layer(x)
        layer.tiling = Tiling(tile_size=side)
        y_tiled, logdet_tiled = layer(x)
        x_back, _ = layer.inverse(y_tiled)
    torch.testing.assert_close(y_tiled, y_full, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logdet_tiled, logdet_full, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(x_back, x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: Glow(3, (12, 20), levels=2, steps=2, hidden=8, reversible=True), (3, 12, 20)),
        (lambda: Glow(2, (4, 12), levels=1, steps=3, hidden=8, scale="exp", reversible=True), (2, 4, 12)),
        (lambda: RealNVP(2, (6, 10), scales=2, hidden=8, reversible=True), (2, 6, 10)),
    ],
)
@pytest.mark.parametrize("side", [2, 3])
def test_tiled_reversible_gradients_equal_untiled(make, shape, side):
    torch.manual_seed(0)
    model = make().train()
    x = torch.rand(2, *shape) - 0.5
    model.log_prob(x)
    perturb_parameters(model, 0.05)
    loss_full, grads_full = loss_and_grads(model, x)
    model.set_tiling(tile_size=side)
    net = next(m for m in model.modules() if hasattr(m, "tiling")).net
    calls = []
    hook = net.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    loss_tiled, grads_tiled = loss_and_grads(model, x)
    hook.remove()
    assert len(calls) > 2, "the network must run tile by tile in the forward and the backward"
    torch.testing.assert_close(loss_tiled, loss_full, rtol=1e-6, atol=0)
    for g_tiled, g_full in zip(grads_tiled, grads_full):
        torch.testing.assert_close(g_tiled, g_full, rtol=1e-4, atol=1e-6)


def test_a_chain_of_your_own_layers_tiles_through_fastflow_nn_set_tiling():
    """``set_tiling`` was a method of the built-in models only, which take no custom conditioners: a chain of
    one's own couplings had to set each ``coupling.tiling`` by hand, with a ``Tiling`` not exported."""
    from fastflow.nn import ActNorm, FlowSequential, InvConv1x1, Tiling, conv_subnet, set_tiling

    torch.manual_seed(0)
    layers = [m for _ in range(2) for m in (ActNorm(4), InvConv1x1(4), AffineCoupling(4, subnet=conv_subnet(8)))]
    chain = FlowSequential(*layers, reversible=True)
    x = torch.randn(2, 4, 6, 5)
    chain(x)  # ActNorm's init
    perturb_parameters(chain, 0.05)

    def loss_and_grads_of_chain() -> tuple[torch.Tensor, list[torch.Tensor]]:
        chain.zero_grad(set_to_none=True)
        z, logdet = chain(x)
        loss = (0.5 * z.square().sum() - logdet.sum()) / x.numel()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in chain.parameters()]

    loss_full, grads_full = loss_and_grads_of_chain()
    set_tiling(chain, tile_size=2)
    couplings = [m for m in chain.modules() if isinstance(m, AffineCoupling)]
    assert all(m.tiling == Tiling(tile_size=2) for m in couplings)
    calls = []
    hook = couplings[0].net.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    loss_tiled, grads_tiled = loss_and_grads_of_chain()
    hook.remove()
    assert len(calls) > 2, "the network must run tile by tile in the forward and the backward"
    torch.testing.assert_close(loss_tiled, loss_full, rtol=1e-6, atol=0)
    for g_tiled, g_full in zip(grads_tiled, grads_full):
        torch.testing.assert_close(g_tiled, g_full, rtol=1e-4, atol=1e-6)
    set_tiling(chain)
    assert all(m.tiling is None for m in couplings)


class _GainedNetwork(torch.nn.Module):
    """A conv subnet plus a parameter reached through a sum: its gradient comes back as an expanded view."""

    halo = 2

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        from fastflow.nn import conv_subnet

        self.inner = conv_subnet(8)(in_channels, out_channels)
        self.gain = torch.nn.Parameter(torch.zeros(out_channels))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.inner(h) + 0.01 * self.gain.sum()


def test_tiles_sum_a_gradient_that_comes_back_as_an_expanded_view():
    """The tiles' parameter gradients were summed in place: the second tile's add into an expanded view raised."""
    from fastflow.nn import FlowSequential, set_tiling

    torch.manual_seed(0)
    chain = FlowSequential(AffineCoupling(4, subnet=_GainedNetwork), reversible=True)
    x = torch.randn(2, 4, 6, 6)
    grads = []
    for tile_size in (None, 2):
        set_tiling(chain, tile_size=tile_size)
        chain.zero_grad(set_to_none=True)
        z, logdet = chain(x)
        (z.square().sum() - logdet.sum()).backward()
        grads.append([p.grad.clone() for p in chain.parameters()])
    for tiled, whole in zip(*grads):
        torch.testing.assert_close(tiled, whole, rtol=1e-4, atol=1e-6)


def test_set_tiling_refused_by_one_coupling_leaves_every_coupling_as_it_was():
    from fastflow.nn import FlowSequential, mlp_subnet, set_tiling

    chain = FlowSequential(AffineCoupling(4, subnet=_GainedNetwork), AffineCoupling(4, subnet=mlp_subnet(8)))
    with pytest.raises(ValueError, match="declares none, so it cannot be tiled exactly"):
        set_tiling(chain, tile_size=2)
    assert all(m.tiling is None for m in chain.modules() if isinstance(m, AffineCoupling))


def test_tile_size_from_memory_budget():
    side = choose_tile_size(batch=4, hidden=512, element_size=4, memory_budget_mb=1024)
    per_pixel = 4 * 512 * 4 * ACTIVE_HIDDEN_TENSORS
    assert (side + 2 * HALO) ** 2 * per_pixel <= 1024 * 2**20 < (side + 2 * HALO + 1) ** 2 * per_pixel
    with pytest.warns(RuntimeWarning, match="tiles of 1 pixel, over budget"):
        assert choose_tile_size(batch=64, hidden=4096, element_size=4, memory_budget_mb=1) == 1
    assert Tiling(memory_budget_mb=1024).side(4, 512, 4) == side
    assert Tiling(tile_size=7).side(4, 512, 4) == 7


def test_set_tiling_reaches_every_coupling_and_turns_off():
    model = Glow(1, 8, levels=2, steps=2, hidden=8)
    model.set_tiling(memory_budget_mb=64)
    couplings = [m for m in model.modules() if isinstance(m, AffineCoupling)]
    assert couplings and all(m.tiling == Tiling(memory_budget_mb=64) for m in couplings)
    model.set_tiling()
    assert all(m.tiling is None for m in couplings)


@pytest.mark.parametrize("kwargs", [{"tile_size": 0}, {"memory_budget_mb": -1.0}])
def test_bad_tiling_arguments_raise(kwargs):
    with pytest.raises(ValueError, match="must be"):
        Tiling(**kwargs)


@pytest.mark.parametrize("budget", [0, -5, float("nan"), float("inf")])
def test_set_tiling_refuses_a_budget_that_is_not_positive_and_finite(budget):
    model = Glow(1, 8, levels=1, steps=1, hidden=8)
    with pytest.raises(ValueError, match="memory_budget_mb must be a finite number > 0"):
        model.set_tiling(memory_budget_mb=budget)


@pytest.mark.parametrize("budget", ["100", True])
def test_set_tiling_refuses_a_budget_that_is_not_a_number(budget):
    with pytest.raises(TypeError, match="memory_budget_mb must be a number"):
        Glow(1, 8, levels=1, steps=1, hidden=8).set_tiling(memory_budget_mb=budget)


def test_set_tiling_of_a_model_without_tileable_layers_is_refused():
    model = Jet(1, 8, patch_size=2, couplings=2, width=8, depth=1, heads=2)
    with pytest.raises(ValueError, match="Jet has no layer that runs in spatial tiles"):
        model.set_tiling(tile_size=2)
    model.set_tiling()  # turning tiling off is always fine


def test_tile_cost_model_matches_a_measured_peak():
    """The automatic tile size's cost model is a measurement: one tile's backward peaks at most at
    ACTIVE_HIDDEN_TENSORS hidden-width tensors per pixel, and not far below (else tiles are needlessly small)."""
    from benchmarks.tile_memory import measure_isolated

    measured = measure_isolated(batch=2, hidden=128, side=48)
    assert ACTIVE_HIDDEN_TENSORS - 1.5 < measured <= ACTIVE_HIDDEN_TENSORS


def _normed_halo_conv(in_channels: int, out_channels: int) -> HaloConv:
    """:class:`~tests.helpers.HaloConv` with a batch norm after its first convolution (halo 2 still)."""
    net = HaloConv(in_channels, out_channels)
    net.insert(1, torch.nn.BatchNorm2d(HaloConv.hidden))
    return net


def test_a_conditioner_with_statistics_over_the_pixels_is_not_tiled():
    """A batch norm in training mode took its statistics per tile (and updated its running ones once per tile):
    another function, silently. In eval mode it is per-pixel, and tiles exactly."""
    from fastflow.nn import FlowSequential

    layer = AffineCoupling(4, scale="exp", subnet=_normed_halo_conv)
    layer.tiling = Tiling(tile_size=3)
    x = torch.randn(2, 4, 6, 10)
    with torch.no_grad(), pytest.raises(ValueError, match=r"1 \(BatchNorm2d\) in training mode"):
        layer(x)  # tiled where the network runs without a graph
    layer.eval()
    with torch.no_grad():
        y_tiled = layer(x)[0]
        layer.tiling = None
        torch.testing.assert_close(y_tiled, layer(x)[0])
    group_normed = AffineCoupling(4, scale="exp", subnet=_normed_halo_conv)
    group_normed.net[1] = torch.nn.GroupNorm(2, 6)
    chain = FlowSequential(group_normed, reversible=True)
    group_normed.tiling = Tiling(tile_size=3)
    with pytest.raises(ValueError, match=r"GroupNorm\) \(statistics over each image\)"):
        chain(x)


def test_parameter_hooks_are_refused_by_the_tiled_backward():
    """Each tile's gradient ran the hooks, then the summed one ran them again: a hook doubling its gradient gave 4
    times the true gradient at 8 tiles, not 2."""
    from fastflow.nn import FlowSequential

    layer = AffineCoupling(4, hidden=8, scale="exp")
    perturb_parameters(layer, 0.3)
    chain = FlowSequential(layer, reversible=True)
    layer.net[0].weight.register_hook(lambda grad: 2 * grad)
    x = torch.randn(2, 4, 6, 10)
    y, logdet = chain(x)
    (y.square().sum() + logdet.sum()).backward()  # untiled: the hook as usual
    layer.tiling = Tiling(tile_size=3)
    y, logdet = chain(x)
    with pytest.raises(ValueError, match="tensor hooks"):
        (y.square().sum() + logdet.sum()).backward()
