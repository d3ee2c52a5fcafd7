"""What an ahead-of-time compile check needs to know of one kernel launch configuration."""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["AotSpec"]


class AotSpec(NamedTuple):
    """One launch configuration of a ``@triton.jit`` kernel, for
    ``triton.compile(ASTSource(kernel, signature, constexprs, attrs), target, options={"num_warps": ...})``.

    ``signature`` maps every argument name to a Triton type (``"*fp32"``, ``"i32"``, ``"constexpr"``);
    ``constexprs`` gives the values of the ``constexpr`` ones; ``num_warps`` is what the launcher uses.
    ``spill_free`` says the compiled code must not spill under register pressure (float64 launches, a dtype
    for gradient checks rather than speed, are only required to compile). ``int_args`` are the integer
    arguments of a real launch of this configuration: the compile then specialises them as Triton's launcher
    does (an integer equal to 1 becomes a constant, one divisible by 16 is marked so, and so is every
    pointer: allocations are 16-byte aligned), so the registers and load widths checked are those of the
    code that runs. Without ``int_args`` only the pointers are marked.
    """

    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    spill_free: bool = True
    int_args: dict[str, int] | None = None

    def specialised(self) -> tuple[dict[str, str], dict[str, Any], list[str]]:
        """``(signature, constexprs, divisible)``: integer arguments equal to 1 moved to the constexprs, and
        the names of the arguments to mark divisible by 16 (pointers, and integers that are multiples of 16)."""
        signature, constexprs = dict(self.signature), dict(self.constexprs)
        divisible = [name for name, kind in signature.items() if kind.startswith("*")]
        for name, value in (self.int_args or {}).items():
            if value == 1:
                signature[name], constexprs[name] = "constexpr", 1
            elif value % 16 == 0:
                divisible.append(name)
        return signature, constexprs, divisible
