"""How tasks are balanced: loss weighting and gradient aggregation behind one interface.

Importing this package registers every built-in method in :data:`BALANCERS`.
"""

from . import aggregation, weighting
from .aggregation import (
    DBMTL,
    IMTL,
    IMTLG,
    MGDA,
    AlignedMTL,
    AlignedMTLUB,
    CAGrad,
    ConFIG,
    ExcessMTL,
    FairGrad,
    FairGradNotConverged,
    GradDrop,
    GradNorm,
    GradNormScaling,
    GradVac,
    NashMTL,
    NashMTLNotConverged,
    PCGrad,
    UPGrad,
)
from .base import BALANCERS, BackwardContext, Balancer, LossWeighting
from .gradient import GradientBalancer, GramianWeighting
from .weighting import DWA, FAMO, GLS, RLW, STCH, Equal, FixedWeights, UncertaintyWeighting

__all__ = [
    "BALANCERS",
    "DBMTL",
    "DWA",
    "FAMO",
    "GLS",
    "IMTL",
    "IMTLG",
    "MGDA",
    "RLW",
    "STCH",
    "AlignedMTL",
    "AlignedMTLUB",
    "BackwardContext",
    "Balancer",
    "CAGrad",
    "ConFIG",
    "Equal",
    "ExcessMTL",
    "FairGrad",
    "FairGradNotConverged",
    "FixedWeights",
    "GradDrop",
    "GradNorm",
    "GradNormScaling",
    "GradVac",
    "GradientBalancer",
    "GramianWeighting",
    "LossWeighting",
    "NashMTL",
    "NashMTLNotConverged",
    "PCGrad",
    "UPGrad",
    "UncertaintyWeighting",
    "aggregation",
    "weighting",
]
