"""Tests for fastflow/ops/invconv.py: the LU weight against its definition, batched, and its inverse."""

from __future__ import annotations

import pytest
import torch

from fastflow.ops.invconv import lu_inverse_weight, lu_weight_and_logdet


def _factors(batch: tuple[int, ...], channels: int, packed: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(channels + len(batch))
    shape = (*batch, channels, channels)
    lower = (0.3 * torch.randn(shape, generator=g, dtype=torch.float64)).requires_grad_()
    upper = lower if packed else (0.3 * torch.randn(shape, generator=g, dtype=torch.float64)).requires_grad_()
    perm = torch.stack([torch.randperm(channels, generator=g) for _ in range(max(1, int(torch.tensor(batch).prod())))])
    return {
        "perm": perm.reshape(*batch, channels),
        "lower": lower,
        "upper": upper,
        "sign_s": torch.where(torch.rand(*batch, channels, generator=g) < 0.5, -1.0, 1.0).double(),
        "log_s": (0.2 * torch.randn(*batch, channels, generator=g, dtype=torch.float64)).requires_grad_(),
    }


def _by_definition(perm, lower, upper, sign_s, log_s) -> torch.Tensor:
    """``P @ L @ (U + diag(sign_s * exp(log_s)))``, one matrix at a time, with explicit permutation matrices."""
    channels = lower.shape[-1]
    flat = [t.reshape(-1, *t.shape[len(perm.shape) - 1 :]) for t in (perm, lower, upper, sign_s, log_s)]
    weights = []
    for p, lo, up, sign, ls in zip(*flat):
        permutation = torch.zeros(channels, channels, dtype=lo.dtype)
        permutation[torch.arange(channels), p] = 1.0
        unit_lower = torch.tril(lo, -1) + torch.eye(channels, dtype=lo.dtype)
        weights.append(permutation @ unit_lower @ (torch.triu(up, 1) + torch.diag(sign * torch.exp(ls))))
    return torch.stack(weights).reshape(lower.shape)


@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
@pytest.mark.parametrize("packed", [False, True])
def test_lu_weight_is_the_product_of_its_factors_with_its_gradients(batch, packed):
    factors = _factors(batch, 5, packed)
    weight, logdet = lu_weight_and_logdet(**factors)
    expected = _by_definition(**factors)
    torch.testing.assert_close(weight, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet, factors["log_s"].sum(-1))
    upstream = torch.randn(weight.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    leaves = [t for t in {id(t): t for t in (factors["lower"], factors["upper"], factors["log_s"])}.values()]
    got = torch.autograd.grad((weight * upstream).sum(), leaves)
    want = torch.autograd.grad((expected * upstream).sum(), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch", [(), (4,)])
def test_lu_inverse_weight_inverts_the_weight(batch):
    factors = _factors(batch, 6, packed=True)
    with torch.no_grad():
        weight, _ = lu_weight_and_logdet(**factors)
        inverse = lu_inverse_weight(**factors)
    eye = torch.eye(6, dtype=torch.float64).expand_as(weight)
    torch.testing.assert_close(weight @ inverse, eye, rtol=0, atol=1e-12)


@pytest.mark.parametrize("fn", [lu_weight_and_logdet, lu_inverse_weight], ids=lambda f: f.__name__)
def test_lu_factors_of_the_wrong_shape_or_dtype_are_refused_naming_the_factor(fn):
    """A ``log_s`` of one entry broadcast into a wrong log-det (0.5 for 1.5), an integer ``lower`` gave an integer
    weight, a short ``perm`` an IndexError: each is now an error naming the factor."""
    good = {k: v.detach() for k, v in _factors((), 3, packed=True).items()}
    cases = [
        ({"log_s": good["log_s"][:1]}, ValueError, "log_s must have shape \\(3,\\)"),
        ({"sign_s": good["sign_s"][None]}, ValueError, "sign_s must have shape"),
        ({"lower": good["lower"].long(), "upper": good["lower"].long()}, TypeError, "lower must be float16"),
        ({"upper": good["lower"].float()}, TypeError, "upper must have lower's dtype"),
        ({"upper": good["lower"][:2]}, ValueError, "upper must have lower's shape"),
        ({"lower": good["lower"][:2], "upper": good["lower"][:2]}, ValueError, "lower must be square"),
        ({"perm": good["perm"][:2]}, ValueError, "perm must have shape"),
        ({"perm": good["perm"].double()}, TypeError, "perm must be an integer tensor"),
        ({"perm": good["perm"].to("meta")}, ValueError, "perm must be on cpu like lower"),
    ]
    for change, error, match in cases:
        with pytest.raises(error, match=match):
            fn(**{**good, **change})
