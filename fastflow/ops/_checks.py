"""Argument checks shared by the ops, layers and models: raised at the public boundary, naming the argument."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def int_at_least(name: str, value: object, low: int) -> int:
    """``value``, or a ``TypeError`` (not an int, or a bool) / ``ValueError`` (below ``low``) naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def check_bool(name: str, value: object) -> bool:
    """``value``, or a ``TypeError`` naming ``name`` unless it is a bool (``"no"``, ``1`` or ``None`` would pass
    by truthiness, and a config holding them would not load back)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_float_tensor(name: str, t: object, min_dim: int = 1) -> torch.Tensor:
    """Raise TypeError/ValueError unless ``t`` is a floating tensor of a supported dtype and rank."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimensions, got shape {tuple(t.shape)}")
    return t


def float_tensors_on_one_device(*tensors: object) -> bool:
    """Whether every argument is a tensor of a supported floating dtype and all are on one device: the common
    case of an op's argument checks in one call, which then need not run one by one (they run otherwise, to name
    what is wrong)."""
    device = None
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
            return False
        if device is None:
            device = t.device
        elif t.device != device:
            return False
    return True


def check_same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Raise ValueError unless ``t`` is on ``ref``'s device."""
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref.device} like {ref_name}, got {t.device}")


def check_same_shape(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Raise ValueError unless ``t`` matches ``ref`` in shape, dtype and device."""
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")
    _check_same_dtype_and_device(name, t, ref_name, ref)


def _check_same_dtype_and_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    check_same_device(name, t, ref_name, ref)


def check_channel_slice(
    name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, start_name: str, start: object
) -> None:
    """Raise unless ``t`` matches ``ref`` in dtype, device and shape but for dim 1, and ``start`` is an int that
    puts channels ``[start, start + t.shape[1])`` inside ``ref``'s."""
    if isinstance(start, bool) or not isinstance(start, int):
        raise TypeError(f"{start_name} must be an int, got {type(start).__name__}")
    if t.dim() != ref.dim() or t.shape[:1] + t.shape[2:] != ref.shape[:1] + ref.shape[2:]:
        raise ValueError(
            f"{name} must have the shape of {ref_name} {tuple(ref.shape)} but for dim 1, got {tuple(t.shape)}"
        )
    if not 0 <= start <= start + t.shape[1] <= ref.shape[1]:
        raise ValueError(
            f"{start_name} must put the {t.shape[1]} channels of {name} inside the {ref.shape[1]} of {ref_name},"
            f" got {start}"
        )
    # the two tests above make the shape of ref's channels [start, start + t.shape[1]) t's: dtype and device are
    # left (a check_same_shape of ref.narrow(...) cost an ATen view per call)
    _check_same_dtype_and_device(name, t, ref_name, ref)


def upcasts(t: torch.Tensor) -> bool:
    """Whether an op's eager fallback computes ``t`` in float32 (its ``upcast``): for float16 and bfloat16, as the
    kernels do in their registers, so that both backends round once (a bfloat16 ``log 2`` rounds; a half-precision
    spline's knot sums are not even monotone)."""
    return t.dtype in (torch.float16, torch.bfloat16)


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``: ``t`` itself where it has that dtype already, without the call (``Tensor.to`` parses its
    overloads even when it has nothing to do, about ten times the cost of this test; the hot paths make dozens of
    such calls per forward)."""
    return t if t.dtype == dtype else t.to(dtype)


def logdet_dtype(dtype: torch.dtype) -> torch.dtype:
    """Log-dets accumulate in float32 for half inputs and keep float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32
