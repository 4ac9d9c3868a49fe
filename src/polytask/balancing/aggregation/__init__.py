"""Gradient-level balancing methods: per-task gradients combined into one update."""

from .aligned_mtl import AlignedMTL, AlignedMTLUB
from .cagrad import CAGrad
from .conflict_free import ConFIG
from .consmtl import ConsMTL
from .cr_mogm import CRMOGM
from .db_mtl import DBMTL
from .double_sampling import MoDo, SDMGrad
from .dualproj import DualProj
from .excess_mtl import ExcessMTL
from .fairgrad import FairGrad, FairGradNotConverged
from .grad_norm_scaling import GradNormScaling
from .graddrop import GradDrop
from .gradnorm import GradNorm
from .gradvac import GradVac
from .imtl import IMTL, IMTLG
from .linear import Constant, Mean, Sum
from .mgda import MGDA
from .moco import MoCo
from .nash_mtl import NashMTL, NashMTLNotConverged
from .ntkmtl import NTKMTL
from .pcd import PCD
from .pcgrad import PCGrad
from .pivrg import PIVRG
from .robust import Krum, TrimmedMean
from .samo import SAMO
from .upgrad import UPGrad

__all__ = [
    "CRMOGM",
    "DBMTL",
    "IMTL",
    "IMTLG",
    "MGDA",
    "NTKMTL",
    "PCD",
    "PIVRG",
    "SAMO",
    "AlignedMTL",
    "AlignedMTLUB",
    "CAGrad",
    "ConFIG",
    "ConsMTL",
    "Constant",
    "DualProj",
    "ExcessMTL",
    "FairGrad",
    "FairGradNotConverged",
    "GradDrop",
    "GradNorm",
    "GradNormScaling",
    "GradVac",
    "Krum",
    "Mean",
    "MoCo",
    "MoDo",
    "NashMTL",
    "NashMTLNotConverged",
    "PCGrad",
    "SDMGrad",
    "Sum",
    "TrimmedMean",
    "UPGrad",
]
