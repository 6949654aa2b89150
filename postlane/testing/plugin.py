"""pytest plugin (auto-registered): the ``postlane_env`` fixture.

::

    async def test_code_email(postlane_env):
        handle = await postlane_env.client.send(Email(...), key="code-1")
        await handle.result()
        assert "847291" in postlane_env.outbox[0].message.get_content()
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from postlane.testing import PostlaneTestEnv, postlane_test_env

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the fixture needs pytest-asyncio; stay out of the way
    pytest_asyncio = None

if pytest_asyncio is not None:

    @pytest_asyncio.fixture
    async def postlane_env() -> AsyncIterator[PostlaneTestEnv]:
        """A fresh time-skipping Temporal, SMTP catcher and Postlane workers for one test."""
        async with postlane_test_env() as env:
            yield env
