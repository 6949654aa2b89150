"""Postlane's workflows: deterministic code only (no I/O, no clock, no randomness)."""

from workflows.send_email import SendEmailWorkflow

WORKFLOWS: list[type] = [SendEmailWorkflow]

__all__ = ["WORKFLOWS", "SendEmailWorkflow"]
