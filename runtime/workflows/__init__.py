"""Workflows: what a study does, one class each (base.py has the protocol). The server's controller
owns the loop, deadlines and checkpoints; a workflow says what to send, how to fold a result, how to
close a round, and what to remember across a restart."""

from .base import JobResults, RoundOutcome, RoundPlan, SiteResult, Workflow, WorkflowContext, weighted_metrics
from .cross_site import CrossSiteWorkflow
from .evaluate import EvaluateWorkflow
from .fedavg import FedAvgWorkflow
from .initial_model import InitialModel

# the names config_fed_server.yml `workflows:` accepts (job_spec.WorkflowName), and their classes
WORKFLOWS: dict[str, type] = {"fedavg": FedAvgWorkflow, "evaluate": EvaluateWorkflow, "cross_site": CrossSiteWorkflow}

__all__ = ["WORKFLOWS", "CrossSiteWorkflow", "EvaluateWorkflow", "FedAvgWorkflow", "InitialModel", "JobResults",
           "RoundOutcome", "RoundPlan", "SiteResult", "Workflow", "WorkflowContext", "weighted_metrics"]
