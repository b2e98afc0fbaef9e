"""Pure routing decision code: request features -> candidates -> scores -> pick."""

from .base import Candidate, Decision, PolicyBase, RequestFeatures, RoutingPolicy
from .factory import make_policy

__all__ = [
    "Candidate",
    "Decision",
    "PolicyBase",
    "RequestFeatures",
    "RoutingPolicy",
    "make_policy",
]
