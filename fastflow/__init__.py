"""fastflow: normalizing flows for PyTorch (Glow, Jet, RealNVP, NICE, tabular and spline flows) with Triton kernels."""

from fastflow.backend import backend
from fastflow.checkpoint import load_checkpoint, save_checkpoint
from fastflow.models import NICE, NSF, FlowModel, Glow, Jet, RealNVP, TabularFlow, dequantize
from fastflow.nn.reversible import ReconstructionError

__version__ = "0.1.0"

__all__ = [
    "NICE",
    "NSF",
    "FlowModel",
    "Glow",
    "Jet",
    "RealNVP",
    "ReconstructionError",
    "TabularFlow",
    "__version__",
    "backend",
    "dequantize",
    "load_checkpoint",
    "save_checkpoint",
]
