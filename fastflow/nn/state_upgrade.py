"""State dicts written by earlier fastflow versions, brought to the current layout: the one place that knows
the old layouts. Each layer's ``_load_from_state_dict`` applies its own entry (so ``load_state_dict`` of a bare
layer works); :func:`upgraded_state_dict` applies them all to a whole model's state dict (for the checkpoint
loader, which checks the keys before loading).

- LU 1x1 convolutions stored ``lower`` and ``upper`` (two ``C x C`` matrices, half of each unused) and
  ``log_s``, then ``lu_packed`` (L's strict lower part, U's strict upper part, the diagonal unused) and
  ``log_s``: now one ``lu_packed`` with ``log_s`` on its diagonal.
- Jet's token couplings stored ``inverse_order`` beside ``order``: no longer used, dropped.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["drop_inverse_order", "pack_lu_factors", "upgraded_state_dict"]


def pack_lu_factors(state_dict: dict[str, Any], prefix: str) -> None:
    """In place: ``<prefix>log_s`` and either ``<prefix>lower`` and ``<prefix>upper`` or an earlier
    ``<prefix>lu_packed`` packed into one ``<prefix>lu_packed`` (``log_s`` on its diagonal)."""
    lower, upper, packed, log_s = prefix + "lower", prefix + "upper", prefix + "lu_packed", prefix + "log_s"
    if log_s not in state_dict:
        return
    if lower in state_dict and upper in state_dict and packed not in state_dict:
        state_dict[packed] = torch.tril(state_dict.pop(lower), -1) + torch.triu(state_dict.pop(upper), 1)
    if packed in state_dict:
        strict = torch.tril(state_dict[packed], -1) + torch.triu(state_dict[packed], 1)
        state_dict[packed] = strict + torch.diag_embed(state_dict.pop(log_s))


def drop_inverse_order(state_dict: dict[str, Any], prefix: str) -> None:
    """In place: a token coupling's ``<prefix>inverse_order`` (beside ``<prefix>order``) removed."""
    if prefix + "order" in state_dict:
        state_dict.pop(prefix + "inverse_order", None)


def upgraded_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A copy of a model's ``state_dict`` with every entry of an earlier layout brought to the current one."""
    upgraded = dict(state_dict)
    for key in state_dict:
        if key.endswith("log_s"):
            pack_lu_factors(upgraded, key.removesuffix("log_s"))
        elif key.endswith("inverse_order"):
            drop_inverse_order(upgraded, key.removesuffix("inverse_order"))
    return upgraded
