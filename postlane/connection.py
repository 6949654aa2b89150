"""Connecting to Temporal the way Temporal users expect, with Postlane's data converter."""

from __future__ import annotations

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter
from temporalio.envconfig import ClientConfig

DEFAULT_ADDRESS = "localhost:7233"
DEFAULT_NAMESPACE = "postlane"


def data_converter() -> DataConverter:
    """The converter every Postlane client and worker must share (pydantic v2 models)."""
    return pydantic_data_converter


async def connect_temporal(address: str | None = None, namespace: str | None = None) -> Client:
    """Connect using ``TEMPORAL_ADDRESS``, ``TEMPORAL_NAMESPACE``, ``TEMPORAL_API_KEY``,
    ``TEMPORAL_TLS_*`` and Temporal's config profiles; arguments win over the environment.

    Defaults: ``localhost:7233`` and the ``postlane`` namespace that `postlane dev` creates.
    """
    config = ClientConfig.load_client_connect_config()
    if address:
        config["target_host"] = address
    if namespace:
        config["namespace"] = namespace
    config.setdefault("target_host", DEFAULT_ADDRESS)
    config.setdefault("namespace", DEFAULT_NAMESPACE)
    return await Client.connect(**config, data_converter=data_converter())
