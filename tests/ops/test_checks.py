"""The hot-path helpers of the argument checks: the dtype cast that skips identity calls, the one-call tests of the
common case, and the first-parameter lookup, each against what it stands in for."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fastflow.nn.base import check_features, first_floating_parameter
from fastflow.ops import actnorm_invconv, coupling
from fastflow.ops._checks import cast, float_tensors_on_one_device
from fastflow.ops.actnorm_invconv import _check_args
from fastflow.ops.coupling import _affine_args_fit, _check_affine_args


def test_cast_returns_the_tensor_itself_for_its_own_dtype_and_converts_otherwise():
    x = torch.randn(3, requires_grad=True)
    assert cast(x, torch.float32) is x
    y = cast(x, torch.float64)
    assert y.dtype == torch.float64 and torch.equal(y, x.to(torch.float64)) and y.grad_fn is not None


def test_float_tensors_on_one_device():
    a, b = torch.randn(2), torch.randn(3, dtype=torch.float64)
    assert float_tensors_on_one_device(a, b)
    assert not float_tensors_on_one_device(a, torch.zeros(2, dtype=torch.long))
    assert not float_tensors_on_one_device(a, torch.zeros(2, dtype=torch.complex64))
    assert not float_tensors_on_one_device(a, torch.zeros(2, dtype=torch.float8_e4m3fn))  # floating, not supported
    assert not float_tensors_on_one_device(a, 1.0)
    assert not float_tensors_on_one_device(a, torch.randn(2, device="meta"))


class _OwnAfterChild(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.child = nn.Linear(2, 2)
        self.steps = nn.Parameter(torch.zeros(2, dtype=torch.long), requires_grad=False)
        self.own = nn.Parameter(torch.zeros(1, dtype=torch.float64))


def _first_by_parameters(module: nn.Module) -> nn.Parameter | None:
    return next((p for p in module.parameters() if p.is_floating_point()), None)


@pytest.mark.parametrize(
    "module",
    [
        nn.Sequential(nn.ReLU(), nn.Sequential(nn.Identity(), nn.Linear(2, 3)), nn.Linear(3, 1)),
        _OwnAfterChild(),  # its own parameters come first, whatever the registration order; the integer one is skipped
        nn.Sequential(nn.Linear(2, 2, bias=False)),
    ],
)
def test_first_floating_parameter_is_the_first_of_parameters(module):
    assert first_floating_parameter(module) is _first_by_parameters(module) is not None


class _ChoosesItsParameters(nn.Module):
    """A conditioner whose ``parameters()`` leaves out a frozen float64 part registered first."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(2, 2).double()
        self.head = nn.Linear(2, 2)

    def parameters(self, recurse: bool = True):
        return self.head.parameters(recurse)


def test_first_floating_parameter_honours_an_overridden_parameters_and_ends_on_cycles():
    chooser = _ChoosesItsParameters()
    assert first_floating_parameter(chooser) is chooser.head.weight
    looped = nn.Sequential(nn.ReLU())
    looped[0].parent = looped  # a cycle: each module is walked once, as parameters() does
    assert first_floating_parameter(looped) is None is _first_by_parameters(looped)


def test_first_floating_parameter_asks_an_overridden_parameters_in_its_order():
    class Listed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.count = nn.Parameter(torch.zeros(1, dtype=torch.long), requires_grad=False)
            self.w = nn.Parameter(torch.zeros(1))

        def parameters(self, recurse: bool = True):
            return iter([self.count, self.w])

    listed = Listed()
    assert first_floating_parameter(listed) is listed.w


def test_first_floating_parameter_passes_an_unset_submodule():
    holder = nn.Module()
    holder.register_module("gone", None)
    holder.lin = nn.Linear(2, 2)
    assert first_floating_parameter(holder) is holder.lin.weight


def test_check_features_refuses_what_its_fast_test_does_not_take():
    x = torch.randn(2, 3)
    assert check_features("x", x, 3) is x and check_features("x", x) is x
    with pytest.raises(ValueError, match="channel mismatch|feature mismatch"):
        check_features("x", torch.randn(2, 4), 3)
    with pytest.raises(TypeError, match="floating-point"):
        check_features("x", torch.zeros(2, 3, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="rank 3"):
        check_features("x", torch.randn(2, 3, 4), 3)


def test_resolve_backend_shortcut_only_for_cpu_tensors_under_auto(monkeypatch):
    backend = importlib.import_module("fastflow.backend")  # fastflow.backend the attribute is the context manager
    monkeypatch.setattr(backend, "_TRITON_AVAILABLE", True)
    monkeypatch.setattr(backend, "_INTERPRETER_ENABLED", False)
    assert backend.resolve_backend(SimpleNamespace(is_cuda=True, device="cuda:0")) == "triton"
    monkeypatch.setattr(backend, "_DEFAULT", "triton")  # FASTFLOW_BACKEND=triton: a CPU tensor is refused
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        backend.resolve_backend(torch.zeros(1))


def test_first_floating_parameter_without_floating_parameters():
    holder = nn.Module()
    holder.count = nn.Parameter(torch.zeros(1, dtype=torch.long), requires_grad=False)
    holder.empty = nn.Sequential(nn.ReLU())
    holder.register_parameter("unset", None)
    assert first_floating_parameter(holder) is None is _first_by_parameters(holder)


def _affine_cases():
    x, part = torch.randn(2, 5, 3), torch.randn(2, 2, 3)
    yield (x, x.clone(), x.clone(), "exp", None), True
    yield (x, part, part.clone(), "sigmoid", 3), True
    yield (x, part, part.clone(), "sigmoid", 4), False  # channels 4..5 past the 5 of x
    yield (x, part, part.clone(), "sigmoid", -1), False
    yield (x, part, part.clone(), "sigmoid", True), False  # a bool is not a b_start
    yield (x, part, part.clone(), "softplus", 0), False
    yield (x, part, part.double(), "exp", 0), False
    yield (x, part, torch.randn(2, 2, 4), "exp", 0), False
    yield (x, torch.randn(2, 2, 4), torch.randn(2, 2, 4), "exp", 0), False
    yield (x, x.clone(), x.clone()[:, :4], "exp", None), False
    yield (x[0, 0], x[0, 0].clone(), x[0, 0].clone(), "exp", None), False  # rank 1
    yield (x, x.to("meta"), x.to("meta"), "exp", None), False
    yield (x.long(), x.long(), x.long(), "exp", None), False
    yield (x, x[:, :2].double(), x[:, :2].double(), "exp", 0), False  # shift and raw agree, x does not
    yield (x, x.double(), x.double(), "exp", None), False
    yield (x, torch.randn(1, 2, 3), torch.randn(1, 2, 3), "exp", 0), False  # another batch
    yield (x[:, :, 0], torch.randn(2), torch.randn(2), "exp", 0), False  # rank-1 shift for a rank-2 x
    yield (x, x[:, :2].clone(), x[:, :2].clone(), "exp", None), False  # a part of x's channels, no b_start


@pytest.mark.parametrize(("args", "fits"), list(_affine_cases()))
def test_affine_fast_check_accepts_exactly_what_the_full_checks_accept(args, fits, monkeypatch):
    assert _affine_args_fit(*args) is fits
    monkeypatch.setattr(coupling, "_affine_args_fit", lambda *a: False)  # the full checks alone
    if fits:
        _check_affine_args("x_b", *args)
    else:
        with pytest.raises((TypeError, ValueError)):
            _check_affine_args("x_b", *args)


@pytest.mark.parametrize(
    ("which", "dtype_or_device", "error"),
    [(0, torch.long, TypeError), (4, torch.long, TypeError), (1, "meta", ValueError), (4, "meta", ValueError)],
)
def test_actnorm_invconv_checks_refuse_a_dtype_or_device_the_fast_test_does_not_take(which, dtype_or_device, error):
    tensors = [torch.randn(4, 3), torch.randn(1, 3, 1, 1), torch.randn(1, 3, 1, 1), torch.randn(3, 3), torch.randn(())]
    tensors[which] = tensors[which].to(dtype_or_device)
    with pytest.raises(error):
        _check_args("x", tensors[0], *tensors[1:3], "weight", *tensors[3:])


@pytest.mark.parametrize(
    ("shapes", "ok"),
    [
        (((4, 3), (1, 3, 1, 1), (1, 3, 1, 1), (3, 3), ()), True),
        (((4, 3, 2, 2), (1, 3, 1, 1), (1, 3, 1, 1), (3, 3), (1,)), True),
        (((4, 3, 2), (1, 3, 1, 1), (1, 3, 1, 1), (3, 3), ()), False),
        (((4, 3), (1, 2, 1, 1), (1, 3, 1, 1), (3, 3), ()), False),
        (((4, 3), (1, 3, 1, 1), (3,), (3, 3), ()), False),
        (((4, 3), (1, 3, 1, 1), (1, 3, 1, 1), (3, 2), ()), False),
        (((4, 3), (1, 3, 1, 1), (1, 3, 1, 1), (3, 3), (2,)), False),
    ],
)
@pytest.mark.parametrize("fast_path", [True, False])
def test_actnorm_invconv_checks_take_the_common_case_and_refuse_the_rest(shapes, ok, fast_path, monkeypatch):
    if not fast_path:  # the full checks alone must agree
        monkeypatch.setattr(actnorm_invconv, "float_tensors_on_one_device", lambda *tensors: False)
    tensors = [torch.randn(shape) for shape in shapes]
    if ok:
        _check_args("x", tensors[0], *tensors[1:3], "weight", *tensors[3:])
    else:
        with pytest.raises(ValueError):
            _check_args("x", tensors[0], *tensors[1:3], "weight", *tensors[3:])
