"""Flow models: Glow, Jet, RealNVP and NICE for images, TabularFlow and NSF for vectors; with log_prob, encode,
decode, sample and rsample, optionally conditioned on a context."""

from fastflow.models.base import FlowModel, dequantize
from fastflow.models.glow import Glow
from fastflow.models.jet import Jet
from fastflow.models.nice import NICE
from fastflow.models.nsf import NSF
from fastflow.models.realnvp import RealNVP
from fastflow.models.tabular import TabularFlow

__all__ = ["FlowModel", "Glow", "Jet", "NICE", "NSF", "RealNVP", "TabularFlow", "dequantize"]
