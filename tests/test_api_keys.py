"""API keys (`postlane.api.keys`, ``postlane api-key``), the ``[api]`` settings and the
generated reference, without a server (tests/test_api.py has the live ones)."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import cast

import pytest

from postlane import ConfigurationError, load_settings
from postlane.api.keys import KeyStore
from postlane.api.reference import main as reference_main
from postlane.errors import InvalidInput
from postlane.senders import SenderScope, parse_sender_patterns
from tests.procs import REPO_ROOT, postlane_env, run_postlane


def test_a_key_is_stored_as_its_hash_only_and_checks_its_senders(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    record, plaintext = store.create(parse_sender_patterns("Agent@Acme.test, *@ops.acme.test"))
    assert plaintext.startswith(f"pl_{record.id}_") and len(plaintext) == 3 + 8 + 1 + 43
    raw = (tmp_path / "keys.json").read_text()
    assert plaintext not in raw and plaintext.split("_", 2)[2] not in raw
    assert stat.S_IMODE((tmp_path / "keys.json").stat().st_mode) == 0o600
    assert store.authenticate(plaintext) == record
    assert record.allows("agent@acme.test") and record.allows("ALERTS@ops.acme.test")
    assert not record.allows("agent@other.test") and not record.allows("x@deep.ops.acme.test")
    for wrong in ("", "pl_", plaintext[:-1], plaintext + "x", f"pl_{record.id}_{'A' * 43}"):
        assert store.authenticate(wrong) is None, wrong


def test_a_revoked_key_fails_at_once_in_another_process_view(tmp_path: Path) -> None:
    server_view = KeyStore(tmp_path / "keys.json")
    cli_view = KeyStore(tmp_path / "keys.json")
    record, plaintext = cli_view.create(["*"])
    assert server_view.authenticate(plaintext) == record
    cli_view.revoke(record.id)
    assert server_view.authenticate(plaintext) is None  # re-read: the file changed
    assert cli_view.revoke(record.id).revoked_at is not None  # twice: no change, no error
    with pytest.raises(InvalidInput) as caught:
        cli_view.revoke("00000000")
    assert caught.value.field == "id"


@pytest.mark.parametrize("senders", ["", " , ", "not-an-address", "*@", "a@b@c.test"])
def test_bad_sender_patterns_are_refused_naming_the_field(senders: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_sender_patterns(senders)
    assert caught.value.field == "senders"


def test_one_sender_scope_matches_bare_addresses_without_regard_to_case() -> None:
    scope = SenderScope(parse_sender_patterns(["agent@acme.test", "*@Ops.Acme.test,*@*.b.test"]))
    assert scope.allows("Ada <agent@ACME.test>") and scope.allows("alerts@ops.acme.TEST")
    assert scope.allows("x@deep.b.test") and not scope.allows("x@b.test")
    assert not scope.allows("agent@acme.test.evil.test") and not scope.allows("not an address")
    assert not scope.allows("x@evil.test <agent@other.test>")
    assert SenderScope().allows("anyone@anywhere.test") and not SenderScope().restricted
    # `*` among other patterns allows every sender, even one no address parser reads.
    anyone = SenderScope(["agent@acme.test", "*"])
    assert not anyone.restricted and anyone.allows("not an address")
    assert str(scope) == "agent@acme.test, *@Ops.Acme.test, *@*.b.test"


async def test_mcp_refuses_bad_sender_patterns_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "postlane.toml"
    config.write_text("")
    env = postlane_env("127.0.0.1:1", config)  # refused before any connection
    rc, _, err = await run_postlane(["mcp", "--senders", "agent@acme.test,*@"], env)
    assert rc == 2 and err.startswith("error: InvalidInput: senders: '*@'"), err


def test_a_malformed_keys_file_is_a_configuration_error(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text('{"keys": [{"id": 1}]}')
    with pytest.raises(ConfigurationError) as caught:
        KeyStore(path).keys()
    assert str(caught.value).startswith(f"keys_file: {path}")


async def test_api_key_cli_prints_the_key_once_and_lists_no_secret(tmp_path: Path) -> None:
    config = tmp_path / "postlane.toml"
    keys_file = tmp_path / "keys.json"
    config.write_text(f'[api]\nkeys_file = "{keys_file}"\n')
    env = postlane_env("127.0.0.1:1", config)  # no Temporal needed
    rc, out, err = await run_postlane(
        ["api-key", "create", "--senders", "agent@acme.test,*@ops.acme.test", "--name", "bot"],
        env,
    )
    assert rc == 0, err
    [plaintext] = out.split()
    assert "only time it is shown" in err and plaintext not in err
    rc, out, _ = await run_postlane(["api-key", "list"], env)
    [listed] = [json.loads(line) for line in out.splitlines()]
    assert listed["senders"] == ["agent@acme.test", "*@ops.acme.test"]
    assert listed["name"] == "bot" and listed["revoked_at"] is None
    assert plaintext not in out and "sha256" not in listed
    assert KeyStore(keys_file).authenticate(plaintext) is not None

    rc, _, err = await run_postlane(["api-key", "create", "--senders", "nobody"], env)
    assert rc == 2 and err.startswith("error: InvalidInput: senders: 'nobody'"), err
    rc, _, err = await run_postlane(["api-key", "revoke", "ffffffff"], env)
    assert rc == 2 and "id: no API key has the id 'ffffffff'" in err, err
    rc, out, _ = await run_postlane(["api-key", "revoke", listed["id"]], env)
    assert rc == 0 and KeyStore(keys_file).authenticate(plaintext) is None


def test_api_settings_in_the_file_and_bad_ones_name_file_line_field(tmp_path: Path) -> None:
    path = tmp_path / "postlane.toml"
    path.write_text('[api]\npublic_url = "https://mail.acme.test/"\nmax_recipients = 10\n')
    settings = load_settings(path)
    assert settings.api.public_url == "https://mail.acme.test"
    assert settings.api.max_recipients == 10
    path.write_text('[api]\nspecs_dir = "s"\npublic_url = "http://mail.acme.test"\n')
    with pytest.raises(ConfigurationError) as caught:
        load_settings(path)
    assert str(caught.value).startswith(f"{path}:3: api.public_url: 'http://mail.acme.test'")
    path.write_text("[api]\nmax_recipients = 101\n")
    with pytest.raises(ConfigurationError) as caught:
        load_settings(path)
    assert str(caught.value).startswith(f"{path}:2: api.max_recipients:")


def test_docs_reference_is_generated_from_the_current_openapi() -> None:
    assert reference_main([str(REPO_ROOT / "docs" / "api.md"), "--check"]) == 0


async def test_temporal_not_answering_is_a_503_problem(tmp_path: Path) -> None:
    import httpx
    from temporalio.service import RPCError, RPCStatusCode

    from postlane.api.app import create_app
    from postlane.client import PostlaneClient
    from postlane.config import Settings

    class Unreachable:
        settings = Settings()

        async def describe(self, key: str) -> None:
            raise RPCError("connection refused", RPCStatusCode.UNAVAILABLE, b"")

    store = KeyStore(tmp_path / "keys.json")
    _, plaintext = store.create(["*"])
    app = create_app(cast(PostlaneClient, Unreachable()), keys=store)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        response = await http.get("/v1/emails/k1", headers={"Authorization": f"Bearer {plaintext}"})
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == "5"
    assert response.json()["type"] == "urn:postlane:problem:temporal-unavailable"
