"""Flow models: Glow, RealNVP and NICE, with log_prob, bits_per_dim, encode, decode and sample."""

from fastflow.models.base import FlowModel, dequantize
from fastflow.models.glow import Glow
from fastflow.models.nice import NICE
from fastflow.models.realnvp import RealNVP

__all__ = ["FlowModel", "Glow", "NICE", "RealNVP", "dequantize"]
