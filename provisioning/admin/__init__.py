"""The operator console: Django admin for jobs, agents and job events.

State is read-only here; operators change it only through actions that call services
(provisioning.services) and leave a JobEvent naming them. Built for tables of millions of rows.
"""

from provisioning.admin import agents, alerts, capacity, jobs

__all__ = ["agents", "alerts", "capacity", "jobs"]
