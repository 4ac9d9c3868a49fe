"""How tasks are balanced: loss weighting and gradient aggregation behind one interface."""

from . import weighting
from .base import BALANCERS, BackwardContext, Balancer, LossWeighting
from .weighting import Equal

__all__ = ["BALANCERS", "BackwardContext", "Balancer", "Equal", "LossWeighting", "weighting"]
