"""Backbones that architectures wrap; each registered in :data:`polytask.models.BACKBONES`."""

from .lenet import LeNet
from .mpnn import MPNN
from .resnet import BasicBlock, ResNet
from .segnet import SegNet
from .small import MLP, SmallCNN
from .staged import StagedBackbone, StageOutput, StageSpec, run_stages

__all__ = ["MLP", "SegNet", "SmallCNN", "StageOutput", "StageSpec", "StagedBackbone", "run_stages"]
__all__ += ["BasicBlock", "ResNet"]
__all__ += ["MPNN"]
__all__ += ["LeNet"]
