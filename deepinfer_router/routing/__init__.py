"""Pure routing decision code: request features -> candidates -> scores -> pick."""

from .base import Candidate, Decision, PolicyBase, RequestFeatures, RoutingPolicy

__all__ = ["Candidate", "Decision", "PolicyBase", "RequestFeatures", "RoutingPolicy"]
