"""pytest plugin: the ``postlane_env`` fixture, for those who install ``postlane[testing]``.

It is not registered automatically (an entry point would load it into every pytest run of
anyone who installed postlane); load it in a ``conftest.py``::

    pytest_plugins = ["postlane.testing.plugin"]

or on the command line: ``pytest -p postlane.testing.plugin``. Then:

::

    async def test_code_email(postlane_env):
        handle = await postlane_env.client.send(Email(...), key="code-1")
        await handle.result()
        assert "847291" in postlane_env.outbox[0].message.get_content()
"""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator

from postlane.testing import PostlaneTestEnv, postlane_test_env

# The fixture needs pytest-asyncio; without it, stay out of the way of the user's pytest.
if importlib.util.find_spec("pytest_asyncio") is not None:
    import pytest_asyncio

    @pytest_asyncio.fixture
    async def postlane_env() -> AsyncIterator[PostlaneTestEnv]:
        """A fresh time-skipping Temporal, SMTP catcher and Postlane workers for one test."""
        async with postlane_test_env() as env:
            yield env
