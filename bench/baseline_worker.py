"""Worker process of the baseline app: ``python bench/baseline_worker.py``.

Reads ``TEMPORAL_ADDRESS`` and ``TEMPORAL_NAMESPACE``; serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from baseline_app import (
    ACTIVITY_QUEUE,
    WORKFLOW_QUEUE,
    TrivialWorkflow,
    VariantWorkflow,
    noop,
    noop_variant,
)
from temporalio.client import Client
from temporalio.worker import Worker

MAX_CONCURRENT = 64  # like the Postlane lane under test


async def main() -> None:
    client = await Client.connect(
        os.environ.get("TEMPORAL_ADDRESS", "localhost:7233"),
        namespace=os.environ.get("TEMPORAL_NAMESPACE", "default"),
    )
    workers = [
        Worker(client, task_queue=WORKFLOW_QUEUE, workflows=[TrivialWorkflow, VariantWorkflow]),
        Worker(
            client,
            task_queue=ACTIVITY_QUEUE,
            activities=[noop, noop_variant],
            max_concurrent_activities=MAX_CONCURRENT,
        ),
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runs = [asyncio.create_task(w.run()) for w in workers]
    print("baseline worker: started", flush=True)
    await stop.wait()
    await asyncio.gather(*(w.shutdown() for w in workers), return_exceptions=True)
    await asyncio.gather(*runs, return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(main())
    sys.stdout.flush()
    os._exit(0)  # the SDK can abort at interpreter shutdown (sdk-python#300)
