"""Workflows: the named steps of a federated algorithm. The server's controller owns the loop,
deadlines and checkpoints; a workflow only says what to send, how to fold a result, how to close."""

from .fedavg import FedAvg, SiteResult, weighted_metrics

__all__ = ["FedAvg", "SiteResult", "weighted_metrics"]
