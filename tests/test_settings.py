"""server/settings.py on its own: defaults, the shipped settings.toml, overrides, refusals."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import pytest

from server.settings import (
    SECTIONS,
    ChannelRule,
    IssuerSettings,
    Settings,
    SettingsError,
    build_settings,
    load_settings,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "settings.toml"

# PROTOCOL §9, key by key.
PROTOCOL_DEFAULTS: dict[str, dict[str, Any]] = {
    "server": {"host": "127.0.0.1", "port": 8080, "workers": "auto", "shutdown_timeout": 10, "trusted_proxies": ()},
    "database": {"url": "", "data_dir": "var/pgdata", "pool_size": 10},
    "auth": {
        "jwt_secret": "",
        "jwt_algorithm": "HS256",
        "jwt_issuer": "herald",
        "jwt_audience": "herald",
        "token_ttl": 3600,
        "bcrypt_rounds": 12,
        "session_secret": "",
    },
    "cors": {"origins": ()},
    "limits": {"body_bytes": 65536, "rate": 50, "burst": 100, "login_rate": 5},
    "events": {"history_size": 10000, "history_ttl": 86400},
    "realtime": {
        "heartbeat": 25,
        "sse_ping": 15,
        "sse_max_channels": 32,
        "max_frame_bytes": 65536,
        "outbound_buffer": 1048576,
    },
    "metrics": {"token": ""},
}


def section_dict(settings: Settings, section: str) -> dict[str, Any]:
    return dataclasses.asdict(getattr(settings, section))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- defaults and the shipped file ------------------------------------------------------


@pytest.mark.parametrize("section", sorted(PROTOCOL_DEFAULTS))
def test_defaults_are_the_protocol_values(section):
    values = section_dict(build_settings({}, {}), section)
    assert {key: values[key] for key in PROTOCOL_DEFAULTS[section]} == PROTOCOL_DEFAULTS[section]


def test_no_channel_rules_by_default_and_every_protocol_section_exists():
    assert build_settings({}, {}).channels == ()
    assert set(PROTOCOL_DEFAULTS) == set(SECTIONS)


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_shipped_settings_toml_documents_every_key(section):
    text = SHIPPED.read_text()
    raw = tomllib.loads(text)
    fields = {f.name for f in dataclasses.fields(SECTIONS[section])}
    if section == "auth":  # none by default: shown as a commented [[auth.issuers]] table with every key
        fields.remove("issuers")
        example = text.split("# [[auth.issuers]]\n", 1)[1].split("\n\n", 1)[0]
        shown = {line[2:].split("=")[0].strip() for line in example.splitlines()}
        assert shown == {f.name for f in dataclasses.fields(IssuerSettings)}
    assert set(raw[section]) == fields
    assert set(PROTOCOL_DEFAULTS[section]) <= set(raw[section])


def test_shipped_settings_toml_loads_with_the_default_values():
    settings = load_settings(SHIPPED, {})
    assert dataclasses.replace(settings, channels=()) == Settings()
    assert settings.channels, "the shipped file shows example channel rules"
    assert all(isinstance(rule, ChannelRule) and rule.pattern for rule in settings.channels)


# --- which file is read -----------------------------------------------------------------


def test_settings_toml_in_the_working_directory_is_the_default_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_settings(None, {}) == Settings()
    write(tmp_path / "settings.toml", "[server]\nport = 9001\n")
    assert load_settings(None, {}).server.port == 9001


def test_herald_settings_picks_the_file_and_an_explicit_path_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "settings.toml", "[server]\nport = 9001\n")
    chosen = write(tmp_path / "chosen.toml", "[server]\nport = 9002\n")
    explicit = write(tmp_path / "explicit.toml", "[server]\nport = 9003\n")
    environ = {"HERALD_SETTINGS": str(chosen)}
    assert load_settings(None, environ).server.port == 9002
    assert load_settings(explicit, environ).server.port == 9003


# --- environment overrides --------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "text", "section", "key", "expected"),
    [
        ("HERALD_SERVER_PORT", "9000", "server", "port", 9000),
        ("HERALD_SERVER_HOST", "0.0.0.0", "server", "host", "0.0.0.0"),
        ("HERALD_SERVER_WORKERS", "auto", "server", "workers", "auto"),
        ("HERALD_SERVER_WORKERS", "4", "server", "workers", 4),
        ("HERALD_SERVER_SHUTDOWN_TIMEOUT", "2.5", "server", "shutdown_timeout", 2.5),
        ("HERALD_SERVER_SHUTDOWN_TIMEOUT", "3", "server", "shutdown_timeout", 3.0),
        ("HERALD_SERVER_TRUSTED_PROXIES", "10.0.0.0/8, ::1", "server", "trusted_proxies", ("10.0.0.0/8", "::1")),
        ("HERALD_LIMITS_RATE", "0", "limits", "rate", 0.0),
        ("HERALD_LIMITS_BURST", " 7 ", "limits", "burst", 7),
        ("HERALD_AUTH_JWT_ALGORITHM", "HS512", "auth", "jwt_algorithm", "HS512"),
        ("HERALD_AUTH_TOKEN_TTL", "60", "auth", "token_ttl", 60),
        ("HERALD_DATABASE_URL", "postgresql://h/db", "database", "url", "postgresql://h/db"),
        ("HERALD_METRICS_TOKEN", "t0ken", "metrics", "token", "t0ken"),
        ("HERALD_REALTIME_HEARTBEAT", "0.5", "realtime", "heartbeat", 0.5),
        ("HERALD_REALTIME_COMPRESSION", "true", "realtime", "compression", True),
        ("HERALD_REALTIME_COMPRESSION", "ON", "realtime", "compression", True),
        ("HERALD_REALTIME_COMPRESSION", "1", "realtime", "compression", True),
        ("HERALD_REALTIME_COMPRESSION", "no", "realtime", "compression", False),
        ("HERALD_REALTIME_COMPRESSION", "0", "realtime", "compression", False),
        ("HERALD_CORS_ORIGINS", "https://a.example,https://b.example", "cors", "origins", None),
        ("HERALD_CORS_ORIGINS", " https://a.example , https://b.example ,", "cors", "origins", None),
        ("HERALD_CORS_ORIGINS", '["https://a.example", "https://b.example"]', "cors", "origins", None),
        ("HERALD_CORS_ORIGINS", "", "cors", "origins", ()),
        ("HERALD_CORS_ORIGINS", "[]", "cors", "origins", ()),
    ],
)
def test_environment_overrides_a_key_with_its_type(variable, text, section, key, expected):
    if expected is None:
        expected = ("https://a.example", "https://b.example")
    value = section_dict(build_settings({}, {variable: text}), section)[key]
    assert value == expected
    assert type(value) is type(expected)


def test_environment_beats_the_file_and_leaves_other_keys_alone(tmp_path):
    path = write(tmp_path / "s.toml", '[server]\nport = 9001\nhost = "0.0.0.0"\n[limits]\nburst = 7\n')
    settings = load_settings(path, {"HERALD_SERVER_PORT": "9002"})
    assert (settings.server.port, settings.server.host, settings.limits.burst) == (9002, "0.0.0.0", 7)


def test_toml_types_are_normalised():
    settings = build_settings({"server": {"shutdown_timeout": 3, "trusted_proxies": ["127.0.0.1"]}}, {})
    assert settings.server.shutdown_timeout == 3.0
    assert isinstance(settings.server.shutdown_timeout, float)
    assert settings.server.trusted_proxies == ("127.0.0.1",)


@pytest.mark.parametrize(("raw", "environ"), [({"server": {"workers": 3}}, {}), ({}, {"HERALD_SERVER_WORKERS": "3"})])
def test_worker_count_is_the_configured_number(raw, environ):
    assert build_settings(raw, environ).server.worker_count == 3


def test_worker_count_auto_is_at_least_one():
    assert build_settings({}, {}).server.worker_count >= 1


def test_database_url_overrides_file_and_herald_variable(tmp_path):
    path = write(tmp_path / "s.toml", '[database]\nurl = "postgresql://file/db"\n')
    environ = {"HERALD_DATABASE_URL": "postgresql://herald/db", "DATABASE_URL": "postgres://u:p@env/db"}
    assert load_settings(path, environ).database.url == "postgres://u:p@env/db"
    assert load_settings(path, {}).database.url == "postgresql://file/db"


def test_admin_bootstrap_variables_are_not_overrides():
    environ = {"HERALD_ADMIN_USERNAME": "root", "HERALD_ADMIN_PASSWORD": "hunter2", "HERALD_SETTINGS": ""}
    assert build_settings({}, environ) == Settings()


def test_replace_changes_one_section_only():
    settings = build_settings({}, {}).replace("database", url="postgresql://x/y")
    assert settings.database.url == "postgresql://x/y"
    assert settings.database.pool_size == 10
    assert settings.server == Settings().server


def test_channel_rules_are_read_in_order():
    rules = [{"pattern": "public:*", "subscribe": ["anonymous"]}, {"pattern": "*", "publish": ["publisher"]}]
    assert build_settings({"channels": rules}, {}).channels == (
        ChannelRule("public:*", ("anonymous",), ()),
        ChannelRule("*", (), ("publisher",)),
    )


# --- refusals: SettingsError naming the key ---------------------------------------------


def rule(**item: Any) -> dict[str, Any]:
    return {"channels": [item]}


BAD_VALUES = [
    # structure
    ({"serverr": {"port": 1}}, {}, "serverr"),
    ({"port": 8080}, {}, "port"),
    ({"server": 5}, {}, "server"),
    ({"server": {"portt": 1}}, {}, "server.portt"),
    ({}, {"HERALD_SERVER_PORTT": "1"}, "HERALD_SERVER_PORTT"),
    ({}, {"HERALD_SERVR_PORT": "1"}, "HERALD_SERVR_PORT"),
    ({}, {"HERALD_CHANNELS_PATTERN": "*"}, "HERALD_CHANNELS_PATTERN"),
    # types
    ({"server": {"port": "x"}}, {}, "server.port"),
    ({}, {"HERALD_SERVER_PORT": "x"}, "server.port"),
    ({}, {"HERALD_SERVER_PORT": "80.5"}, "server.port"),
    ({"server": {"port": 8080.5}}, {}, "server.port"),
    ({"server": {"port": True}}, {}, "server.port"),
    ({"server": {"host": 1}}, {}, "server.host"),
    ({"server": {"shutdown_timeout": "soon"}}, {}, "server.shutdown_timeout"),
    ({}, {"HERALD_SERVER_SHUTDOWN_TIMEOUT": "soon"}, "server.shutdown_timeout"),
    ({"server": {"workers": 0}}, {}, "server.workers"),
    ({"server": {"workers": -2}}, {}, "server.workers"),
    ({"server": {"workers": 2.5}}, {}, "server.workers"),
    ({"server": {"workers": "many"}}, {}, "server.workers"),
    ({"server": {"workers": True}}, {}, "server.workers"),
    ({}, {"HERALD_SERVER_WORKERS": "0"}, "server.workers"),
    ({}, {"HERALD_SERVER_WORKERS": "Auto"}, "server.workers"),
    ({"realtime": {"compression": "yes"}}, {}, "realtime.compression"),
    ({}, {"HERALD_REALTIME_COMPRESSION": "maybe"}, "realtime.compression"),
    ({"server": {"trusted_proxies": "10.0.0.1"}}, {}, "server.trusted_proxies"),
    ({"cors": {"origins": [1]}}, {}, "cors.origins"),
    ({}, {"HERALD_CORS_ORIGINS": '["https://a.example",'}, "cors.origins"),
    ({}, {"HERALD_CORS_ORIGINS": "[1, 2]"}, "cors.origins"),
    # numbers: negative, zero, not finite, out of range
    ({"limits": {"body_bytes": -1}}, {}, "limits.body_bytes"),
    ({"limits": {"rate": -0.5}}, {}, "limits.rate"),
    ({}, {"HERALD_LIMITS_RATE": "-1"}, "limits.rate"),
    ({"events": {"history_ttl": -86400}}, {}, "events.history_ttl"),
    ({"realtime": {"heartbeat": -25}}, {}, "realtime.heartbeat"),
    ({"database": {"pool_size": 0}}, {}, "database.pool_size"),
    ({"database": {"publish_flights": 0}}, {}, "database.publish_flights"),
    ({"server": {"shutdown_timeout": float("nan")}}, {}, "server.shutdown_timeout"),
    ({}, {"HERALD_REALTIME_HEARTBEAT": "inf"}, "realtime.heartbeat"),
    ({"server": {"port": 0}}, {}, "server.port"),
    ({"server": {"port": 65536}}, {}, "server.port"),
    ({}, {"HERALD_SERVER_PORT": "99999"}, "server.port"),
    ({"auth": {"bcrypt_rounds": 3}}, {}, "auth.bcrypt_rounds"),
    ({"auth": {"bcrypt_rounds": 32}}, {}, "auth.bcrypt_rounds"),
    # algorithms
    ({"auth": {"jwt_algorithm": "none"}}, {}, "auth.jwt_algorithm"),
    ({"auth": {"jwt_algorithm": "None"}}, {}, "auth.jwt_algorithm"),
    ({"auth": {"jwt_algorithm": "HS1024"}}, {}, "auth.jwt_algorithm"),
    ({}, {"HERALD_AUTH_JWT_ALGORITHM": "none"}, "auth.jwt_algorithm"),
    ({"auth": {"jwt_algorithm": "RS256"}}, {}, "auth.jwt_public_key_file"),
    # channel rules
    (rule(subscribe=["anonymous"]), {}, "channels[0].pattern"),
    ({"channels": [{"pattern": "*"}, {"publish": ["admin"]}]}, {}, "channels[1].pattern"),
    (rule(pattern=""), {}, "channels[0].pattern"),
    (rule(pattern=5), {}, "channels[0].pattern"),
    (rule(pattern="*", publsh=["admin"]), {}, "channels[0].publsh"),
    (rule(pattern="*", subscribe="anonymous"), {}, "channels[0].subscribe"),
    ({"channels": ["*"]}, {}, "channels[0]"),
    ({"channels": {"pattern": "*"}}, {}, "channels"),
    # addresses and URLs
    ({"server": {"trusted_proxies": ["not-an-ip"]}}, {}, "server.trusted_proxies"),
    ({"server": {"trusted_proxies": ["10.0.0.0/33"]}}, {}, "server.trusted_proxies"),
    ({}, {"HERALD_SERVER_TRUSTED_PROXIES": "10.0.0.1,proxy.local"}, "server.trusted_proxies"),
    ({"cors": {"origins": ["app.example.com"]}}, {}, "cors.origins"),
    ({}, {"DATABASE_URL": "mysql://u:p@h/db"}, "database.url"),
    ({"database": {"url": "herald"}}, {}, "database.url"),
]


@pytest.mark.parametrize(("raw", "environ", "key"), BAD_VALUES)
def test_a_bad_value_raises_settings_error_naming_the_key(raw, environ, key):
    with pytest.raises(SettingsError) as info:
        build_settings(raw, environ)
    assert info.value.key == key
    message = str(info.value)
    assert message.startswith(f"{key}: ")
    assert len(message) > len(key) + 2
    assert "\n" not in message


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("syntax.toml", "[server]\nport = = 8080\n", "TOML syntax error"),
        ("unclosed.toml", '[auth]\njwt_secret = "abc\n', "TOML syntax error"),
        ("not-utf8.toml", b'[metrics]\ntoken = "\xff"\n', "TOML syntax error"),
        ("missing.toml", None, "not found"),
        ("a-directory.toml", "", "cannot read"),
    ],
)
def test_a_bad_settings_file_raises_settings_error_naming_the_file(tmp_path, name, content, needle):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    for args in ((path, {}), (None, {"HERALD_SETTINGS": str(path)})):
        with pytest.raises(SettingsError) as info:
            load_settings(*args)
        assert info.value.key == str(path)
        assert needle in str(info.value)
        assert "\n" not in str(info.value)


def test_a_syntax_error_message_gives_the_line(tmp_path):
    path = write(tmp_path / "s.toml", '[server]\nhost = "127.0.0.1"\nport = = 8080\n')
    with pytest.raises(SettingsError, match="line 3"):
        load_settings(path, {})


@pytest.mark.parametrize(
    ("content", "key"),
    [
        ('[auth]\njwt_algorithm = "none"\n', "auth.jwt_algorithm"),
        ("[limits]\nburst = -1\n", "limits.burst"),
        ('[[channels]]\nsubscribe = ["anonymous"]\n', "channels[0].pattern"),
        ('[server]\ntrusted_proxies = ["10.0.0.256"]\n', "server.trusted_proxies"),
        ("[events]\nhistory_size = nan\n", "events.history_size"),
        ("[realtime]\nheartbeat = -inf\n", "realtime.heartbeat"),
    ],
)
def test_a_bad_value_in_a_file_names_the_key(tmp_path, content, key):
    path = write(tmp_path / "s.toml", content)
    with pytest.raises(SettingsError) as info:
        load_settings(path, {})
    assert info.value.key == key
