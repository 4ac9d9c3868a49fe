"""Loss-level balancing methods."""

from .auto_lambda import AutoLambda
from .dwa import DWA
from .equal import Equal
from .famo import FAMO
from .fixed import FixedWeights
from .gls import GLS
from .ldc_mtl import LDCMTL
from .rlw import RLW
from .stch import STCH
from .uncertainty import UncertaintyWeighting

__all__ = [
    "DWA",
    "FAMO",
    "GLS",
    "LDCMTL",
    "RLW",
    "STCH",
    "AutoLambda",
    "Equal",
    "FixedWeights",
    "UncertaintyWeighting",
]
