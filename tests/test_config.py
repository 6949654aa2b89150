"""Configuration: lanes from postlane.toml, environment overrides, precise errors."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from postlane import ConfigurationError, load_settings
from postlane.config import DEV_LANE

TWO_LANES = """\
[[lanes]]
name = "acme"
senders = ["agent@acme.test", "*@ops.acme.test"]
smtp_host = "smtp.acme.test"
smtp_username_env = "ACME_USER"
smtp_password_env = "ACME_PASS"
rate_per_second = 5

[[lanes]]
name = "catchall"
senders = ["*"]
smtp_host = "smtp.other.test"
rate_per_second = {rate}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "postlane.toml"
    path.write_text(text)
    return path


def test_load_settings_routes_senders_most_specific_first(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, TWO_LANES.format(rate=2)))
    assert [lane.name for lane in settings.lanes] == ["acme", "catchall"]
    assert settings.lane_for("agent@acme.test").name == "acme"  # type: ignore[union-attr]
    assert settings.lane_for("bot@ops.acme.test").name == "acme"  # type: ignore[union-attr]
    assert settings.lane_for("x@elsewhere.test").name == "catchall"  # type: ignore[union-attr]


def test_load_settings_unknown_sender_has_no_lane(tmp_path: Path) -> None:
    text = TWO_LANES.split('[[lanes]]\nname = "catchall"')[0]
    settings = load_settings(write(tmp_path, text))
    assert settings.lane_for("x@elsewhere.test") is None


def test_load_settings_bad_field_names_file_line_field(tmp_path: Path) -> None:
    path = write(tmp_path, TWO_LANES.format(rate=-1))
    with pytest.raises(ConfigurationError) as caught:
        load_settings(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:13: lanes.1.rate_per_second:")
    assert "greater than 0" in message


def test_load_settings_syntax_error_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[[lanes]]\nname = "a"\nsenders = ]\n')
    with pytest.raises(ConfigurationError) as caught:
        load_settings(path)
    assert str(caught.value).startswith(f"{path}:3: invalid TOML")


def test_load_settings_non_utf8_names_line(tmp_path: Path) -> None:
    path = tmp_path / "postlane.toml"
    path.write_bytes(b'[[lanes]]\nname = "a"\nsenders = ["x\xff@acme.test"]\n')
    with pytest.raises(ConfigurationError) as caught:
        load_settings(path)
    assert str(caught.value) == f"{path}:3: invalid TOML: not UTF-8 text"


def test_load_settings_unknown_key_rejected(tmp_path: Path) -> None:
    path = write(
        tmp_path, TWO_LANES.format(rate=1).replace("rate_per_second = 5", "rate_per_sec = 5")
    )
    with pytest.raises(ConfigurationError) as caught:
        load_settings(path)
    assert ":7: lanes.0.rate_per_sec:" in str(caught.value)


def test_load_settings_lane_without_smtp_host_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, '[[lanes]]\nname = "a"\nsenders = ["*"]\n')
    with pytest.raises(ConfigurationError) as caught:
        load_settings(path)
    assert "lanes.0.smtp_host" in str(caught.value)


def test_load_settings_duplicate_lane_names_rejected(tmp_path: Path) -> None:
    lane = '[[lanes]]\nname = "a"\nsenders = ["*"]\nsmtp_host = "h"\n'
    with pytest.raises(ConfigurationError) as caught:
        load_settings(write(tmp_path, lane + lane))
    assert "repeated: a" in str(caught.value)


def test_load_settings_missing_explicit_file_is_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="not found"):
        load_settings(tmp_path / "nope.toml")


def test_load_settings_no_file_means_dev_lane(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("POSTLANE_CONFIG", raising=False)
    settings = load_settings()
    assert [lane.name for lane in settings.lanes] == [DEV_LANE]
    assert settings.lanes[0].smtp_port == 1025


def test_load_settings_environment_overrides_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "POSTLANE_LANES", '[{"name": "fromenv", "senders": ["*"], "smtp_host": "env.test"}]'
    )
    settings = load_settings(write(tmp_path, TWO_LANES.format(rate=1)))
    assert [lane.name for lane in settings.lanes] == ["fromenv"]


def test_load_settings_api_key_from_nested_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``POSTLANE_API__PUBLIC_URL`` sets ``[api] public_url`` and keeps the file's other
    ``[api]`` keys (docs/api.md)."""
    monkeypatch.setenv("POSTLANE_API__PUBLIC_URL", "https://mail.env.test/")
    text = TWO_LANES.format(rate=1) + '\n[api]\nspecs_dir = "specs-from-file"\n'
    settings = load_settings(write(tmp_path, text))
    assert settings.api.public_url == "https://mail.env.test"
    assert settings.api.specs_dir == "specs-from-file"


def test_lane_credentials_read_from_environment_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings(write(tmp_path, TWO_LANES.format(rate=1)))
    lane = settings.lane("acme")
    monkeypatch.delenv("ACME_PASS", raising=False)
    monkeypatch.setenv("ACME_USER", "u")
    with pytest.raises(ConfigurationError, match="ACME_PASS is not set"):
        lane.credentials()
    monkeypatch.setenv("ACME_PASS", "s3cret")
    assert lane.credentials() == ("u", "s3cret")
    assert "s3cret" not in lane.model_dump_json()


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ("rate_per_second = 5\nhourly_cap = 3", "hourly_cap: 3 is less than one second"),
        ("hourly_cap = 500\ndaily_cap = 100", "daily_cap: 100 is less than hourly_cap 500"),
        ("rate_per_second = 0", "greater than 0"),
        ("warmup = {start_per_day = 50, factor = 1.0}", "greater than 1"),
    ],
)
def test_load_settings_inconsistent_limits_rejected(
    tmp_path: Path, fields: str, fragment: str
) -> None:
    path = write(tmp_path, f'[[lanes]]\nname = "a"\nsenders = ["*"]\nsmtp_host = "h"\n{fields}\n')
    with pytest.raises(ConfigurationError) as caught:
        load_settings(path)
    assert fragment in str(caught.value)


def test_lane_with_caps_or_warmup_asks_for_slots(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[[lanes]]\nname = "a"\nsenders = ["*"]\nsmtp_host = "h"\nwarmup = {start_per_day = 50}\n'
        '[[lanes]]\nname = "b"\nsenders = ["x@b.test"]\nsmtp_host = "h"\n',
    )
    a, b = load_settings(path).lanes
    assert a.has_quota and a.limits().warmup is not None
    assert not b.has_quota


# -- inboxes -----------------------------------------------------------------------------------

LANE = '[[lanes]]\nname = "acme"\nsenders = ["*"]\nsmtp_host = "smtp.acme.test"\n\n'
INBOX = """\
[[inboxes]]
name = "replies"
imap_host = "imap.acme.test"
imap_tls = "starttls"
username_env = "ACME_IMAP_USER"
password_env = "ACME_IMAP_PASS"
poll_interval = "30s"
"""


def test_load_settings_inbox_with_defaults(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, LANE + INBOX))
    inbox = settings.inbox("replies")
    assert inbox.folder == "INBOX"
    assert inbox.port == 143  # starttls: the plain IMAP port
    assert inbox.poll_interval == timedelta(seconds=30)
    assert inbox.workflow_id == "inbound:replies"
    tls = inbox.model_copy(update={"imap_tls": "tls"})
    assert tls.port == 993
    with pytest.raises(ConfigurationError, match="no inbox named 'nope'"):
        settings.inbox("nope")


def test_load_settings_without_inboxes_watches_nothing(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, LANE)).inboxes == []


@pytest.mark.parametrize(
    ("replace", "line", "fragment"),
    [
        ('imap_tls = "starttls"', 9, "inboxes.0.imap_tls: Input should be 'none'"),
        ('poll_interval = "30s"', 12, "inboxes.0.poll_interval: must be at least 1 second"),
        ('name = "replies"', 7, "inboxes.0.name: 'Replies!': use lower-case"),
        ('folder = "INBOX"', 13, "inboxes.0.password: Extra inputs"),
    ],
)
def test_load_settings_bad_inbox_field_names_file_line_field(
    tmp_path: Path, replace: str, line: int, fragment: str
) -> None:
    bad = {
        'imap_tls = "starttls"': 'imap_tls = "ssl"',
        'poll_interval = "30s"': "poll_interval = 0",
        'name = "replies"': 'name = "Replies!"',
        # a secret written into the file is refused, and the message does not repeat it
        'folder = "INBOX"': 'password = "hunter2"',
    }[replace]
    path = write(tmp_path, LANE + (INBOX + 'folder = "INBOX"\n').replace(replace, bad))
    with pytest.raises(ConfigurationError) as caught:
        load_settings(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert fragment in message
    assert "hunter2" not in message


def test_load_settings_inbox_without_credential_variables_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, LANE + INBOX.replace('password_env = "ACME_IMAP_PASS"\n', ""))
    with pytest.raises(ConfigurationError) as caught:
        load_settings(path)
    assert str(caught.value).startswith(f"{path}:6: inboxes.0.password_env: Field required")


def test_load_settings_duplicate_inbox_names_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="inbox names must be unique; repeated: replies"):
        load_settings(write(tmp_path, LANE + INBOX + "\n" + INBOX))


def test_inbox_credentials_read_from_environment_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox = load_settings(write(tmp_path, LANE + INBOX)).inbox("replies")
    monkeypatch.setenv("ACME_IMAP_USER", "agent")
    monkeypatch.delenv("ACME_IMAP_PASS", raising=False)
    with pytest.raises(ConfigurationError, match="ACME_IMAP_PASS is not set"):
        inbox.credentials()
    monkeypatch.setenv("ACME_IMAP_PASS", "s3cret")
    assert inbox.credentials() == ("agent", "s3cret")
    assert "s3cret" not in inbox.model_dump_json()


def test_load_settings_inboxes_from_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "POSTLANE_INBOXES",
        '[{"name": "env", "imap_host": "h", "username_env": "U", "password_env": "P"}]',
    )
    settings = load_settings(write(tmp_path, LANE + INBOX))
    assert [inbox.name for inbox in settings.inboxes] == ["env"]
