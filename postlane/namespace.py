"""Preparing a Temporal namespace for Postlane: retention and search attributes."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import structlog
from google.protobuf.duration_pb2 import Duration
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.namespace.v1 import NamespaceConfig
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.api.workflowservice.v1 import (
    DescribeNamespaceRequest,
    RegisterNamespaceRequest,
    UpdateNamespaceRequest,
)
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from postlane import search_attributes as sa

log = structlog.get_logger(__name__)

RETENTION = timedelta(days=30)
"""How long closed emails are kept, which is also the idempotency (dedupe) window."""


async def ensure_namespace(
    client: Client, namespace: str, retention: timedelta = RETENTION
) -> None:
    """Create `namespace` with `retention`, or raise an existing one's retention to it."""
    period = Duration(seconds=int(retention.total_seconds()))
    service = client.workflow_service
    try:
        desc = await service.describe_namespace(DescribeNamespaceRequest(namespace=namespace))
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            raise
        await service.register_namespace(
            RegisterNamespaceRequest(
                namespace=namespace, workflow_execution_retention_period=period
            )
        )
        log.info("namespace.created", namespace=namespace, retention_days=retention.days)
        await _until_visible(client, namespace)
        return
    if desc.config.workflow_execution_retention_ttl.seconds < period.seconds:
        await service.update_namespace(
            UpdateNamespaceRequest(
                namespace=namespace, config=NamespaceConfig(workflow_execution_retention_ttl=period)
            )
        )


async def _until_visible(client: Client, namespace: str, within: float = 60.0) -> None:
    """A new namespace reaches every server role only after its cache refresh (~10 s)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            await client.operator_service.list_search_attributes(
                ListSearchAttributesRequest(namespace=namespace)
            )
            return
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND or loop.time() > deadline:
                raise
        await asyncio.sleep(0.5)  # no notification exists for namespace propagation


async def ensure_search_attributes(client: Client, namespace: str) -> None:
    """Register Postlane's search attributes in `namespace` (idempotent)."""
    service = client.operator_service
    try:
        listed = await service.list_search_attributes(
            ListSearchAttributesRequest(namespace=namespace)
        )
        existing = set(listed.custom_attributes)
    except RPCError as err:
        if err.status != RPCStatusCode.UNIMPLEMENTED:
            raise
        existing = set()  # the time-skipping server can only add, and tolerates repeats
    missing = {
        # The SDK's enum mirrors the proto's values one for one.
        key.name: IndexedValueType.ValueType(int(key.indexed_value_type))
        for key in sa.ALL
        if key.name not in existing
    }
    if missing:
        await service.add_search_attributes(
            AddSearchAttributesRequest(namespace=namespace, search_attributes=missing)
        )
        log.info("search_attributes.added", namespace=namespace, names=sorted(missing))
