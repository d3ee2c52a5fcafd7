"""fastflow: normalizing flows (NICE, RealNVP, Glow) for PyTorch with fused Triton kernels."""

from fastflow.backend import backend

__version__ = "0.1.0"

__all__ = ["__version__", "backend"]
