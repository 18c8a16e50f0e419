"""The federated server: registry, job queue, workflows, and the Federation and Admin services."""
