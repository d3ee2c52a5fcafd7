"""What an ahead-of-time compile check needs to know of one kernel launch configuration."""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["AotSpec"]


class AotSpec(NamedTuple):
    """One launch configuration of a ``@triton.jit`` kernel, for
    ``triton.compile(ASTSource(kernel, signature, constexprs), target, options={"num_warps": num_warps})``.

    ``signature`` maps every argument name to a Triton type (``"*fp32"``, ``"i32"``, ``"constexpr"``);
    ``constexprs`` gives the values of the ``constexpr`` ones; ``num_warps`` is what the launcher uses.
    ``spill_free`` says the compiled code must not spill under register pressure (float64 launches, a dtype
    for gradient checks rather than speed, are only required to compile).
    """

    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    spill_free: bool = True
