"""Outer loops: Reptile, first-order MAML and second-order MAML."""

from .base import MetaAlgorithm, MetaGradients, TaskTerms, TaskwiseAlgorithm
from .maml import FOMAML, MAML
from .reptile import Reptile

__all__ = [
    "FOMAML",
    "MAML",
    "MetaAlgorithm",
    "MetaGradients",
    "Reptile",
    "TaskTerms",
    "TaskwiseAlgorithm",
]
