"""Postlane's workflows: deterministic code only (no I/O, no clock, no randomness)."""

from workflows.lane import LaneWorkflow
from workflows.send_email import SendEmailWorkflow

WORKFLOWS: list[type] = [SendEmailWorkflow, LaneWorkflow]

__all__ = ["WORKFLOWS", "LaneWorkflow", "SendEmailWorkflow"]
