"""Jet (``fastflow/models/jet.py``) and its layers (``fastflow/nn/patchify.py``, ``vit.py``, ``token_coupling.py``):
brute-force log-det, exact inverse, reversible gradients, context, fused vs eager, checkpoints, errors."""

from __future__ import annotations

import math
import weakref

import pytest
import torch

import fastflow
from fastflow.backend import interpreter_enabled, triton_available
from fastflow.checkpoint import load_checkpoint, save_checkpoint
from fastflow.models import Jet
from fastflow.nn.patchify import Patchify, patchify, unpatchify
from fastflow.nn.token_coupling import TokenCoupling
from fastflow.nn.vit import ViTConditioner
from tests.helpers import brute_force_logdet, perturb_parameters

TINY = dict(in_channels=1, image_size=4, patch_size=2, couplings=3, width=8, depth=1, heads=2)


def _jet(scale: float = 0.3, **overrides: object) -> Jet:
    """A tiny float64 Jet moved away from its identity initialisation."""
    torch.manual_seed(1)
    model = Jet(**{**TINY, **overrides}).double()  # type: ignore[arg-type]
    perturb_parameters(model, scale)
    return model


def _x(model: Jet, n: int = 2) -> torch.Tensor:
    return torch.rand(n, *model.image_shape, dtype=torch.float64) - 0.5


def _context(n: int, features: int = 3, tokens: int | None = None) -> torch.Tensor:
    shape = (n, features) if tokens is None else (n, tokens, features)
    return torch.randn(shape, dtype=torch.float64)


def _kernels() -> str:
    if not (triton_available() and interpreter_enabled()):
        pytest.skip("needs triton with TRITON_INTERPRET=1")
    return "interpret"


def test_patchify_round_trip_and_layout() -> None:
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 6, 12)
    # token (i, j) = patch rows 2i..2i+1, cols 2j..2j+1; feature (u * p + v) * C + c
    torch.testing.assert_close(tokens[1, 4, (1 * 2 + 0) * 3 + 2], x[1, 2, 2 * 1 + 1, 2 * 1 + 0])
    torch.testing.assert_close(unpatchify(tokens, 2, (3, 4, 6)), x)
    layer = Patchify(3, (4, 6), 2)
    y, logdet = layer(x)
    back, inv_logdet = layer.inverse(y)
    torch.testing.assert_close(back, x, atol=0, rtol=0)
    assert logdet.abs().sum() == 0 and inv_logdet.abs().sum() == 0


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"kinds": ("spatial",), "couplings": 6},
        {"context": 3},
        {"kinds": ("channel", "spatial"), "in_channels": 3, "patch_size": 1},
    ],
    ids=["default_kinds", "spatial_patterns", "context", "odd_features"],
)
def test_logdet_matches_brute_force_jacobian(overrides: dict) -> None:
    model = _jet(**overrides)
    x = _x(model)
    context = _context(2) if model.config["context"] else None
    _, logdet, _ = model.encode_with_logdet(x, context)

    def top(i: int):  # the map of sample i, at its context row
        return lambda v: model.encode(v, None if context is None else context[i : i + 1])[-1]

    brute = torch.cat([brute_force_logdet(top(i), x[i : i + 1]) for i in range(len(x))])
    torch.testing.assert_close(logdet, brute, atol=1e-9, rtol=1e-9)


def test_decode_inverts_encode_and_bits_per_dim_convention() -> None:
    model = _jet()
    x = _x(model, 4)
    latents = model.encode(x)
    assert [z.shape for z in latents] == [x.shape]
    torch.testing.assert_close(model.decode(latents), x, atol=1e-12, rtol=1e-12)
    d = math.prod(model.image_shape)
    expected = (-model.log_prob(x) + d * math.log(256)) / (d * math.log(2))
    torch.testing.assert_close(model.bits_per_dim(x), expected)


def test_initialised_jet_is_the_identity_flow() -> None:
    """Zero-initialised heads: ``t = 0``, ``2 sigmoid(0) = 1``, so the latents are the inputs and the log-det 0."""
    model = Jet(**TINY).double()  # type: ignore[arg-type]
    x = _x(model)
    latents, logdet, _ = model.encode_with_logdet(x)
    torch.testing.assert_close(latents[0], x, atol=0, rtol=0)
    assert logdet.abs().max() == 0


def test_samples_have_the_image_shape_temperature_and_are_not_constant() -> None:
    model = _jet()
    samples = model.sample(5)
    assert samples.shape == (5, *model.image_shape) and samples.std() > 0
    assert model.default_temperature == 0.7
    torch.testing.assert_close(model.sample(2, temperature=0.0), model.decode([torch.zeros(2, 1, 4, 4).double()]))


def _loss_and_grads(model: Jet, x: torch.Tensor, context: torch.Tensor | None, reversible: bool, backend: str):
    model.reversible = reversible
    model.zero_grad(set_to_none=True)
    ctx = None if context is None else context.detach().requires_grad_(True)
    with fastflow.backend(backend):
        loss = model.bits_per_dim(x, ctx).mean()
        loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    return loss.detach(), grads, None if ctx is None else ctx.grad


@pytest.mark.parametrize("context", [False, True], ids=["plain", "context"])
def test_reversible_gradients_match_standard_backprop_float64(context: bool) -> None:
    model = _jet(context=3 if context else 0, couplings=4)
    x = _x(model, 3)
    ctx = _context(3, tokens=2) if context else None
    loss, grads, grad_ctx = _loss_and_grads(model, x, ctx, reversible=False, backend="eager")
    loss_r, grads_r, grad_ctx_r = _loss_and_grads(model, x, ctx, reversible=True, backend="eager")
    torch.testing.assert_close(loss_r, loss, atol=1e-12, rtol=1e-12)
    for g, g_r in zip(grads, grads_r):
        torch.testing.assert_close(g_r, g, atol=1e-10, rtol=1e-10)
    if context:
        assert grad_ctx.abs().max() > 0
        torch.testing.assert_close(grad_ctx_r, grad_ctx, atol=1e-10, rtol=1e-10)


def test_context_changes_the_density_only_after_training_its_path() -> None:
    """The cross-attention output starts at zero: the context has no effect at init, and does once its weights move."""
    torch.manual_seed(0)
    model = Jet(**{**TINY, "context": 3}).double()  # type: ignore[arg-type]
    for name, p in model.named_parameters():
        if "cross" not in name:  # move everything but the context path
            p.data.add_(0.3 * torch.randn_like(p))
    x, c1, c2 = _x(model), _context(2), _context(2)
    torch.testing.assert_close(model.log_prob(x, c1), model.log_prob(x, c2), atol=0, rtol=0)
    perturb_parameters(model, 0.3)
    assert (model.log_prob(x, c1) - model.log_prob(x, c2)).abs().max() > 1e-6
    torch.testing.assert_close(model.decode(model.encode(x, c1), c1), x, atol=1e-12, rtol=1e-12)
    assert model.sample(2, c1).shape == x.shape


@pytest.mark.parametrize("split", ["channel", "spatial"])
def test_token_coupling_fused_matches_eager(split: str) -> None:
    """The coupling's fused ``sigmoid2`` kernels (Triton interpreter) against the eager twins: forward, inverse,
    gradients and the reversible backward from the output."""
    backend = _kernels()
    torch.manual_seed(0)
    layer = TokenCoupling((2, 4), 6, split, pattern="vertical", width=8, depth=1, heads=2).double()  # type: ignore[arg-type]
    perturb_parameters(layer, 0.5)
    x = torch.randn(3, 8, 6, dtype=torch.float64)
    gy, gl = torch.randn_like(x), torch.randn(3, dtype=torch.float64)
    results = {}
    for name in ("eager", backend):
        with fastflow.backend(name):  # type: ignore[arg-type]
            xr = x.clone().requires_grad_(True)
            y, logdet = layer(xr)
            back, neg = layer.inverse(y.detach())
            layer.zero_grad(set_to_none=True)
            grads = torch.autograd.grad((y * gy).sum() + (logdet * gl).sum(), [xr, *layer.parameters()])
            rebuilt, grad_x = layer.backward_from_output(y.detach(), gy, gl)
            from_output = [p.grad.clone() for p in layer.parameters()]
        torch.testing.assert_close(back, x, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(neg, -logdet.detach(), atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(rebuilt, x, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(grad_x, grads[0], atol=1e-10, rtol=1e-10)
        for g, g_out in zip(grads[1:], from_output):
            torch.testing.assert_close(g_out, g, atol=1e-10, rtol=1e-10)
        results[name] = (y.detach(), logdet.detach(), *grads)
    for fused, eager in zip(results[backend], results["eager"]):
        torch.testing.assert_close(fused, eager, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("split", ["channel", "spatial"])
def test_token_coupling_frees_the_handed_output_before_its_vit_runs(split: str) -> None:
    """``backward_from_handed`` empties the list and drops the whole ``y`` and ``grad_y`` once their halves are
    gathered (the reversible walk keeps no other reference): neither is alive when the ViT recomputes; its
    results equal ``backward_from_output``'s."""
    torch.manual_seed(0)
    layer = TokenCoupling((2, 4), 6, split, pattern="horizontal", width=8, depth=1, heads=2).double()  # type: ignore[arg-type]
    perturb_parameters(layer, 0.5)
    x = torch.randn(3, 8, 6, dtype=torch.float64)
    with torch.no_grad():
        y, _ = layer(x)
    gy, gl = torch.randn_like(x), torch.randn(3, dtype=torch.float64)
    expected = layer.backward_from_output(y, gy, gl)
    expected_grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad(set_to_none=True)
    handed = [y.clone(), gy.clone()]
    refs = [weakref.ref(t) for t in handed]
    alive_at_vit = []
    hook = layer.net.register_forward_pre_hook(lambda *_: alive_at_vit.append([r() is not None for r in refs]))
    got = layer.backward_from_handed(handed, gl)
    hook.remove()
    assert handed == [] and alive_at_vit == [[False, False]]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got[0], x, atol=1e-12, rtol=1e-12)
    for p, e in zip(layer.parameters(), expected_grads):
        torch.testing.assert_close(p.grad, e, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="grad_y must have y's shape"):
        layer.backward_from_output(y, torch.randn(3, 8, 7, dtype=torch.float64), gl)


def test_jet_on_the_interpreter_matches_eager_float32() -> None:
    backend = _kernels()
    torch.manual_seed(0)
    model = Jet(**TINY)  # type: ignore[arg-type]
    perturb_parameters(model, 0.3)
    x = torch.rand(2, 1, 4, 4) - 0.5
    loss, grads, _ = _loss_and_grads(model, x, None, reversible=False, backend="eager")
    loss_fused, grads_fused, _ = _loss_and_grads(model, x, None, reversible=True, backend=backend)
    # the loss too: a log-det error that no parameter moves (a constant per element) leaves every gradient alone
    torch.testing.assert_close(loss_fused, loss, atol=0, rtol=1e-5)
    for g, g_f in zip(grads, grads_fused):
        torch.testing.assert_close(g_f, g, atol=1e-5, rtol=1e-4)
    with torch.no_grad(), fastflow.backend(backend):
        latents_fused, logdet_fused, _ = model.encode_with_logdet(x)
    with torch.no_grad():
        latents, logdet, _ = model.encode_with_logdet(x)
    torch.testing.assert_close(logdet_fused, logdet, atol=1e-4, rtol=1e-5)
    for z_f, z in zip(latents_fused, latents):
        torch.testing.assert_close(z_f, z, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_runs_the_vit_low_and_the_flow_in_float32() -> None:
    torch.manual_seed(0)
    model = Jet(**TINY)  # type: ignore[arg-type]
    perturb_parameters(model, 0.3)
    x = torch.rand(2, 1, 4, 4) - 0.5
    seen = []
    model.blocks[0].layers[1].net.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        latents, logdet, _ = model.encode_with_logdet(x)
        assert seen == [torch.bfloat16]
        assert latents[0].dtype == torch.float32 and logdet.dtype == torch.float32
        # y_a = x_a exactly, so the inverse's ViTs see the forward's inputs and give the same bfloat16 outputs
        torch.testing.assert_close(model.decode(latents), x, atol=1e-6, rtol=0)


def test_checkpoint_round_trip(tmp_path) -> None:
    model = _jet(context=2, kinds=("spatial", "channel"), seed=5).float()
    model.save_pretrained(tmp_path)
    loaded = Jet.from_pretrained(tmp_path)
    assert loaded.config == model.config
    x, c = _x(model).float(), _context(2, 2).float()
    torch.testing.assert_close(loaded.log_prob(x, c), model.log_prob(x, c), atol=0, rtol=0)


def test_state_dicts_with_the_earlier_inverse_order_buffer_load(tmp_path) -> None:
    """Jets saved when each token coupling also stored ``inverse_order``, through a checkpoint and directly."""
    model = _jet(seed=5).float()
    old = dict(model.state_dict())
    for key in [k for k in old if k.endswith(".order")]:
        old[key.removesuffix("order") + "inverse_order"] = torch.argsort(old[key])
    fresh = _jet(seed=6).float()
    fresh.load_state_dict(old)
    path = tmp_path / "old.pt"
    save_checkpoint(path, model)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"] = old
    torch.save(payload, path)
    loaded, _ = load_checkpoint(path)
    x = _x(model).float()
    for other in (fresh, loaded):
        torch.testing.assert_close(other.log_prob(x), model.log_prob(x), atol=0, rtol=0)


def test_vit_conditioner_shapes_and_zero_head() -> None:
    net = ViTConditioner(6, 10, tokens=5, width=8, depth=2, heads=2, context_features=3)
    out = net(torch.randn(4, 5, 6), torch.randn(4, 7, 3))
    assert out.shape == (4, 5, 10) and out.abs().max() == 0


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: Jet(1, 6, patch_size=4), ValueError, "divisible by patch_size"),
        (lambda: Jet(1, 8, width=10, heads=4), ValueError, "divisible by heads"),
        (lambda: Jet(1, 8, couplings=0), ValueError, "couplings must be >= 1"),
        (lambda: Jet(1, 8, kinds=("channel", "diagonal")), ValueError, "kinds"),
        (lambda: Jet(1, 8, patch_size=2.0), TypeError, "patch_size must be an int"),
        (lambda: Jet(1, 6, patch_size=2, kinds=("spatial",)), ValueError, "equal halves"),
        (lambda: Jet(1, 4, patch_size=1, kinds=("channel",)), ValueError, r"in_channels \* patch_size\*\*2 = 1"),
        (lambda: Jet(1, 4, patch_size=1), ValueError, "choose a larger patch_size"),  # named a layer's "features"
        (lambda: Jet(1, 4, patch_size=2, kinds=3), TypeError, "kinds must be a sequence"),  # int is not iterable
        (lambda: Jet(1, 8, kinds="channel"), TypeError, "kinds must be a sequence"),
        (lambda: Jet(1, 8, width=8.0), TypeError, "width must be an int"),
        (lambda: ViTConditioner(6, 10, 5, width=8.0), TypeError, "width must be an int"),  # was a ValueError
        (lambda: Patchify(1, (4, 4), 2.0), TypeError, "patch_size must be an int"),  # was a ValueError
        (lambda: TokenCoupling((2, 2), 4.0), TypeError, "features must be an int"),  # was a ValueError
        (lambda: TokenCoupling((2, 2), 1), ValueError, "needs features >= 2"),
        (lambda: Jet(1, 8, depth=0, context=3), ValueError, "needs depth >= 1"),  # the context would be unread
        (lambda: ViTConditioner(6, 10, 5, width=8, depth=0, heads=2, context_features=3), ValueError, "depth >= 1"),
        (lambda: Jet(1, 8, n_bins=None), TypeError, "n_bins must be an int"),  # would not load from a checkpoint
        (lambda: Jet(1, 8, couplings=4, seed=2**64 - 3), ValueError, "seed must be at most 2..64 - couplings"),
        (lambda: Patchify(3, 8, 2), ValueError, r"image_size must be \(H, W\)"),
        (lambda: TokenCoupling((2, 2), 4, "diagonal"), ValueError, "split must be"),  # type: ignore[arg-type]
        (lambda: TokenCoupling((2, 2), 4, pattern="rings"), ValueError, "pattern must be"),  # type: ignore[arg-type]
    ],
)
def test_bad_arguments_raise(make, error, match) -> None:
    with pytest.raises(error, match=match):
        make()


def test_kinds_may_be_any_iterable() -> None:
    """A generator was used up by the check, leaving no kinds (a ZeroDivisionError)."""
    torch.manual_seed(0)
    from_generator = Jet(1, 4, patch_size=2, couplings=3, kinds=(k for k in ("channel", "spatial")))
    assert from_generator.config["kinds"] == ("channel", "spatial")
    torch.manual_seed(0)
    from_tuple = Jet(1, 4, patch_size=2, couplings=3, kinds=("channel", "spatial"))
    x = torch.rand(2, 1, 4, 4) - 0.5
    torch.testing.assert_close(from_generator.log_prob(x), from_tuple.log_prob(x), rtol=0, atol=0)


def test_bad_inputs_raise() -> None:
    model = Jet(**{**TINY, "context": 3})  # type: ignore[arg-type]
    x = torch.rand(2, 1, 4, 4) - 0.5
    with pytest.raises(ValueError, match="context is required"):
        model.log_prob(x)
    with pytest.raises(ValueError, match="context must have shape"):
        model.log_prob(x, torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"with M >= 1, got \(2, 0, 3\)"):  # no tokens: no conditioning at all
        model.log_prob(x, torch.randn(2, 0, 3))
    with pytest.raises(TypeError, match=r"x is torch.float64 but the layer's network is torch.float32"):
        TokenCoupling((2, 2), 4)(torch.randn(2, 4, 4, dtype=torch.float64))
    layer = TokenCoupling((2, 2), 4)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 4, 4\)"):
        layer(torch.randn(2, 4, 5))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        layer(torch.ones(2, 4, 4, dtype=torch.int64))


def test_a_token_order_that_is_not_a_permutation_is_refused_on_load() -> None:
    """A repeated index would leave a token of the output unwritten (uninitialised memory)."""
    model = Jet(3, 4, patch_size=2, couplings=2, width=8, depth=1, heads=2)
    state = model.state_dict()
    key = next(k for k in state if k.endswith(".order"))
    order = state[key].clone()
    order[-1] = order[-2]
    with pytest.raises(RuntimeError, match=f"{key} must be a permutation"):
        Jet(3, 4, patch_size=2, couplings=2, width=8, depth=1, heads=2).load_state_dict({**state, key: order})


def test_backward_from_output_takes_an_output_that_requires_grad() -> None:
    torch.manual_seed(0)
    coupling = TokenCoupling((2, 2), 4, width=8, depth=1, heads=2)
    with torch.no_grad():
        for p in coupling.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 4, 4, requires_grad=True)
    y, logdet = coupling(x)  # y requires grad: the backward must not write over it through its graph
    grad_y, grad_logdet = torch.randn_like(y), torch.randn(2)
    rebuilt, grad_x = coupling.backward_from_output(y, grad_y, grad_logdet)
    torch.autograd.backward([y, logdet], [grad_y, grad_logdet])
    torch.testing.assert_close(rebuilt, x.detach())
    torch.testing.assert_close(grad_x, x.grad)


def test_a_token_grid_the_spatial_patterns_cannot_halve_is_refused_naming_jets_arguments():
    """MNIST-sized 28x28 images in 4x4 patches are a 7 x 7 grid: no checkerboard halves it. Refused when the Jet
    is built, naming image_size and patch_size (before, a TokenCoupling's grid error, at some coupling counts
    only); channel couplings alone take it."""
    with pytest.raises(ValueError, match=r"image_size \(28, 28\) // patch_size 4 is a 7 x 7 grid .* checkerboard"):
        Jet(1, 28, patch_size=4)
    with pytest.raises(ValueError, match=r"3 x 2 grid .* horizontal"):
        Jet(3, (12, 8), patch_size=4, couplings=9)
    Jet(3, (12, 8), patch_size=4, couplings=8, width=8, depth=1, heads=2)  # its patterns all halve a 3 x 2 grid
    Jet(1, 28, patch_size=4, kinds=("channel",), couplings=2, width=8, depth=1, heads=2)


def test_low_level_jet_layers_refuse_bad_arguments_by_name():
    from fastflow.nn.token_coupling import TokenCoupling

    with pytest.raises(ValueError, match="grid must be two ints"):
        TokenCoupling(4, 4)
    layer = TokenCoupling((2, 2), 4, width=8, depth=1, heads=2, context_features=3)
    with pytest.raises(ValueError, match="context must have shape"):
        layer(torch.randn(2, 4, 4), torch.tensor(1.0))
    with pytest.raises(ValueError, match="in_channels must be"):
        Patchify(0, (4, 4), 2)
