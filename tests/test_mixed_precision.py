"""Precision across the public API (from review): bfloat16 autocast steps of every image preset, the flow kept in
the input's dtype, half-precision couplings and plain 1x1 convolutions on the eager backend, float64 training."""

from __future__ import annotations

import math

import pytest
import torch

from fastflow.models import NICE, Glow, Jet, RealNVP, TabularFlow
from fastflow.ops.coupling import affine_coupling, affine_coupling_inverse
from fastflow.step import BitsPerDim, TrainStep, make_adam
from fastflow.train import TrainConfig, train
from tests.helpers import perturb_parameters

PRESETS = {
    "glow": lambda: Glow(3, 8, levels=2, steps=2, hidden=8),
    "realnvp": lambda: RealNVP(3, 8, scales=1, hidden=8),
    "nice": lambda: NICE(3, 8, couplings=2, hidden=8, depth=1),
    "jet": lambda: Jet(3, 8, patch_size=2, couplings=2, width=8, depth=1, heads=2),
}


@pytest.mark.parametrize("name", PRESETS)
def test_a_bf16_autocast_step_trains_every_image_preset_near_its_float32_loss(name: str) -> None:
    """NICE's conditioner output went into the float32 coupling in bfloat16: a TypeError at the first step. Off the
    identity start (at it the conditioners output zeros, which autocast cannot change), the step's loss is the
    float32 one to the bfloat16 rounding of the networks (measured: at most 1.3e-3 relative, Glow), and the
    log-det under autocast is the float32 one within 0.1 nats (measured: at most 0.035; summed in bfloat16 a
    log-det of ~230 nats is off by about one)."""
    torch.manual_seed(0)
    model = PRESETS[name]()
    x = torch.rand(4, 3, 8, 8) - 0.5
    with torch.no_grad():
        model.bits_per_dim(x)  # ActNorm's initialisation
        perturb_parameters(model, 0.1)
        float32_loss = float(model.bits_per_dim(x).mean())
        _, float32_logdet, _ = model.encode_with_logdet(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, logdet, _ = model.encode_with_logdet(x)
    assert logdet.dtype == torch.float32
    torch.testing.assert_close(logdet, float32_logdet, atol=0.1, rtol=0)
    step = TrainStep(BitsPerDim(model), model, make_adam(model.parameters(), 1e-3), amp="bf16")
    loss = float(step(x, None, 1e-3))
    assert math.isfinite(loss) and abs(loss - float32_loss) < 5e-3 * abs(float32_loss), (loss, float32_loss)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_autocast_does_not_let_a_batch_of_another_dtype_in(dtype: torch.dtype) -> None:
    """Autocast lowers the networks' precision, never the flow's: a bfloat16 batch ran the whole flow in bfloat16
    (0.2-0.4 nats off), a float64 one failed in a matrix product."""
    model = TabularFlow(4, transforms=2, hidden=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match=f"x is {dtype} but the model is torch.float32"):
            model.log_prob(torch.randn(3, 4, dtype=dtype))
        assert model.log_prob(torch.randn(3, 4)).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", ["sigmoid", "sigmoid2", "exp"])
def test_half_affine_couplings_on_the_eager_backend_sum_a_float32_log_det(dtype: torch.dtype, scale: str) -> None:
    """In bfloat16 even ``log 2`` rounds: the sigmoid2 log-det of 1,536 elements was 2.7 nats low."""
    torch.manual_seed(0)
    x, shift, raw = torch.randn(2, 1536).to(dtype), torch.zeros(2, 1536, dtype=dtype), torch.randn(2, 1536) / 2
    raw = raw.to(dtype)
    for op in (affine_coupling, affine_coupling_inverse):
        _, logdet = op(x, shift, raw, scale)
        _, exact = op(x.double(), shift.double(), raw.double(), scale)
        assert logdet.dtype == torch.float32
        torch.testing.assert_close(logdet.double(), exact, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_plain_1x1_convolution_runs_in_half_precision(dtype: torch.dtype) -> None:
    """slogdet has no half kernel: Glow(lu=False) in float16/bfloat16 failed in LAPACK."""
    torch.manual_seed(0)
    model = Glow(3, 8, levels=2, steps=1, hidden=8, lu=False).to(dtype).eval()
    log_p = model.log_prob((torch.rand(2, 3, 8, 8) - 0.5).to(dtype))
    assert log_p.dtype == torch.float32 and bool(log_p.isfinite().all())
    weight = model.blocks[0].layers[1].invconv.weight
    torch.testing.assert_close(
        model.blocks[0].layers[1].invconv.weight_logdet().double(), torch.linalg.slogdet(weight.double())[1]
    )


def test_train_takes_a_float64_model() -> None:
    """The batches were float32 whatever the model: a float64 model could not be trained."""
    torch.manual_seed(0)
    model = Glow(3, 8, levels=2, steps=1, hidden=8).double()
    data = torch.randint(0, 256, (8, 3, 8, 8))
    config = TrainConfig(steps=2, batch=4, progress=False, quiet=True)
    train(model, data, config, heldout=data[:4])
    assert all(p.dtype == torch.float64 for p in model.parameters())
