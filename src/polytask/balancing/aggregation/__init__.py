"""Gradient-level balancing methods: per-task gradients combined into one update."""

from .aligned_mtl import AlignedMTL, AlignedMTLUB
from .cagrad import CAGrad
from .conflict_free import ConFIG
from .db_mtl import DBMTL
from .excess_mtl import ExcessMTL
from .fairgrad import FairGrad, FairGradNotConverged
from .grad_norm_scaling import GradNormScaling
from .graddrop import GradDrop
from .gradnorm import GradNorm
from .gradvac import GradVac
from .imtl import IMTL, IMTLG
from .mgda import MGDA
from .nash_mtl import NashMTL, NashMTLNotConverged
from .pcgrad import PCGrad
from .upgrad import UPGrad

__all__ = [
    "DBMTL",
    "IMTL",
    "IMTLG",
    "MGDA",
    "AlignedMTL",
    "AlignedMTLUB",
    "CAGrad",
    "ConFIG",
    "ExcessMTL",
    "FairGrad",
    "FairGradNotConverged",
    "GradDrop",
    "GradNorm",
    "GradNormScaling",
    "GradVac",
    "NashMTL",
    "NashMTLNotConverged",
    "PCGrad",
    "UPGrad",
]
