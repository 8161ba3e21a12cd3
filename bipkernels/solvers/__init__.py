"""Solvers over masked models: BiP, the OMP / IMP / HYDRA / random baselines, and `prune`."""

from .bip import BiP
from .prune import METHODS, prune

__all__ = ["BiP", "prune", "METHODS"]
