"""Settings: settings.toml, then HERALD_<SECTION>_<KEY> and DATABASE_URL overrides.

Every value is checked once at start-up; a bad one raises SettingsError naming the
key, which run.py prints as one line before exiting with status 2.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# A schema name used unquoted in SQL and in the role name <schema>_publisher (63 bytes at most).
SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,47}")
JWT_ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "EdDSA")
# What an application issuer ([[auth.issuers]]) may pin: HMAC with `secret`, the rest with public keys.
ISSUER_HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
ISSUER_KEY_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
ISSUER_KEY_SOURCES = ("secret", "public_key_file", "jwks_file", "jwks_url")
ISSUER_MIN_SECRET_BYTES = 32  # RFC 7518 §3.2: an HS256 key at least as long as its hash
# An issuer's id_prefix is a namespace ending in ':' (Herald's own ids are digits, so never collide).
ID_PREFIX = re.compile(r"[A-Za-z0-9_.@-]{1,63}:")
RESERVED_ROLES = frozenset({"admin", "anonymous", "authenticated", "owner"})
# HERALD_* variables that are not overrides of a settings section.
NON_SETTING_VARIABLES = {"HERALD_SETTINGS", "HERALD_ADMIN_USERNAME", "HERALD_ADMIN_PASSWORD"}


def available_cores() -> int:
    """Cores this process may use: CPU affinity, capped by a cgroup v2 quota (containers)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cores


class SettingsError(Exception):
    """A setting that cannot be used; str() is the one line shown to the operator."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int | str = "auto"
    shutdown_timeout: float = 10.0
    trusted_proxies: tuple[str, ...] = ()
    static_dir: str = "static"
    static_build_dir: str = "var/static"
    keepalive_timeout: float = 15.0
    header_timeout: float = 10.0
    body_timeout: float = 10.0
    max_connections: int = 0
    reserved_connections: int = 32

    @property
    def worker_count(self) -> int:
        return available_cores() if self.workers == "auto" else int(self.workers)


@dataclass(frozen=True, slots=True)
class DatabaseSettings:
    url: str = ""
    data_dir: str = "var/pgdata"
    pool_size: int = 10
    schema: str = "herald"  # Herald's tables and functions live here (PROTOCOL §12)
    publish_wait: float = 5.0  # seconds a publish waits behind an SQL transaction on its channel
    publish_flights: int | str = "auto"  # group-commit batches a worker has in the database at once
    publish_synchronous_commit: bool = True  # false: Herald's publishes commit without waiting for the WAL flush


@dataclass(frozen=True, slots=True)
class IssuerSettings:
    """One application that signs its own users' tokens (PROTOCOL §13), from [[auth.issuers]]."""

    issuer: str
    audience: str
    algorithms: tuple[str, ...]
    id_prefix: str
    secret: str = ""
    public_key_file: str = ""
    jwks_file: str = ""
    jwks_url: str = ""
    allowed_roles: tuple[str, ...] = ()
    max_token_ttl: int = 86400

    @property
    def key_source(self) -> str:
        return next(name for name in ISSUER_KEY_SOURCES if getattr(self, name))


@dataclass(frozen=True, slots=True)
class AuthSettings:
    jwt_secret: str = ""
    jwt_algorithm: str = "HS256"
    jwt_private_key_file: str = ""
    jwt_public_key_file: str = ""
    jwt_issuer: str = "herald"
    jwt_audience: str = "herald"
    token_ttl: int = 3600
    bcrypt_rounds: int = 12
    bcrypt_queue: int = 16
    session_secret: str = ""
    session_ttl: int = 86400
    secrets_dir: str = "var"
    issuers: tuple[IssuerSettings, ...] = ()


@dataclass(frozen=True, slots=True)
class CorsSettings:
    origins: tuple[str, ...] = ()
    max_age: int = 600


@dataclass(frozen=True, slots=True)
class LimitsSettings:
    body_bytes: int = 65536
    rate: float = 50.0
    burst: int = 100
    login_rate: int = 5
    login_ip_rate: int = 20
    connections_per_ip: int = 256
    connections_per_identity: int = 64
    channels_per_connection: int = 128
    json_depth: int = 64  # deepest nesting of arrays/objects accepted in a JSON body or WebSocket message
    batch_events: int = 1000  # events of one POST /api/events, channels of one POST /api/broadcast
    batch_body_bytes: int = 1048576  # body limit of those two endpoints (instead of body_bytes)


@dataclass(frozen=True, slots=True)
class EventsSettings:
    history_size: int = 10000
    history_ttl: int = 86400
    prune_interval: float = 30.0
    page_bytes: int = 1048576


@dataclass(frozen=True, slots=True)
class RealtimeSettings:
    heartbeat: float = 25.0
    sse_ping: float = 15.0
    sse_max_channels: int = 32
    max_frame_bytes: int = 65536
    outbound_buffer: int = 1048576
    compression: bool = False
    max_replays: int = 16
    presence_grace: float = 5.0


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    token: str = ""
    sync_interval: float = 0.25  # seconds between folds of the hub's delivery counters into the metrics


@dataclass(frozen=True, slots=True)
class ChannelRule:
    pattern: str
    subscribe: tuple[str, ...] = ()
    publish: tuple[str, ...] = ()
    presence: bool = False


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    cors: CorsSettings = field(default_factory=CorsSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    events: EventsSettings = field(default_factory=EventsSettings)
    realtime: RealtimeSettings = field(default_factory=RealtimeSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    channels: tuple[ChannelRule, ...] = ()

    @property
    def publish_flights(self) -> int:
        """database.publish_flights; "auto": two for a lone worker, one per worker when there are more.

        Measured (bench.publish's loads, one run each way): a lone worker keeps its rate with
        two flights and its p99 at 500/s falls by a third or more; two workers with two
        flights each published 3,100-3,500/s against 4,200-6,300 with one each, their four
        flights queueing on each other's channel locks."""
        flights = self.database.publish_flights
        if flights == "auto":
            return 2 if self.server.worker_count == 1 else 1
        return int(flights)

    def replace(self, section: str, **values: Any) -> Settings:
        """A copy with some keys of one section changed (tests, the embedded database)."""
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **values)})


SECTIONS: dict[str, type] = {
    f.name: f.default_factory  # type: ignore[misc]
    for f in dataclasses.fields(Settings)
    if f.name != "channels"
}

# The decoders (stdlib json, orjson's encoder) recurse; far below their limits.
MAX_JSON_DEPTH = 255

# Numeric keys that may be zero; every other number must be positive.
ZERO_ALLOWED = {"limits.rate", "cors.max_age", "server.max_connections", "realtime.presence_grace"}


def load_settings(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read the TOML file (if any), apply environment overrides, validate everything."""
    environ = os.environ if environ is None else environ
    path = path or environ.get("HERALD_SETTINGS")
    raw: dict[str, Any] = {}
    if path:
        raw = _read_toml(Path(path))
    elif Path("settings.toml").is_file():
        raw = _read_toml(Path("settings.toml"))
    return build_settings(raw, environ)


def build_settings(raw: Mapping[str, Any], environ: Mapping[str, str]) -> Settings:
    unknown = set(raw) - set(SECTIONS) - {"channels"}
    if unknown:
        raise SettingsError(sorted(unknown)[0], "unknown section or key")
    values: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        section = raw.get(name, {})
        if not isinstance(section, dict):
            raise SettingsError(name, "must be a table")
        if name == "auth":
            section = {key: value for key, value in section.items() if key != "issuers"}
        values[name] = _build_section(name, cls, section, _overrides_for(name, cls, environ))
    _check_overrides_known(environ)
    values["channels"] = _build_channel_rules(raw.get("channels", []))
    auth_table = raw.get("auth", {})
    values["auth"] = dataclasses.replace(values["auth"], issuers=_build_issuers(auth_table.get("issuers", [])))
    url = environ.get("DATABASE_URL")
    if url:
        values["database"] = dataclasses.replace(values["database"], url=url)
    settings = Settings(**values)
    _check_cross_field(settings)
    return settings


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise SettingsError(str(path), "settings file not found") from None
    except OSError as exc:
        raise SettingsError(str(path), f"cannot read settings file: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError(str(path), f"TOML syntax error: {exc}") from None


def _overrides_for(section: str, cls: type, environ: Mapping[str, str]) -> dict[str, str]:
    prefix = f"HERALD_{section.upper()}_"
    keys = {f.name for f in dataclasses.fields(cls)}
    found = {}
    for var, value in environ.items():
        if var.startswith(prefix):
            key = var[len(prefix) :].lower()
            if key not in keys or (section, key) == ("auth", "issuers"):
                raise SettingsError(var, "unknown setting")
            found[key] = value
    return found


def _check_overrides_known(environ: Mapping[str, str]) -> None:
    for var in environ:
        if var.startswith("HERALD_") and var not in NON_SETTING_VARIABLES:
            section = var[len("HERALD_") :].split("_", 1)[0].lower()
            if section not in SECTIONS:
                raise SettingsError(var, "unknown settings section")


def _build_section(name: str, cls: type, table: Mapping[str, Any], env: Mapping[str, str]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in table:
        if key not in fields:
            raise SettingsError(f"{name}.{key}", "unknown key")
    values = {}
    for key, f in fields.items():
        qualified = f"{name}.{key}"
        if key in env:
            values[key] = _coerce(qualified, f.type, _parse_env(qualified, f.type, env[key]))
        elif key in table:
            values[key] = _coerce(qualified, f.type, table[key])
    return cls(**values)


def _parse_env(key: str, type_name: str, text: str) -> Any:
    """Environment values are strings; give them the shape the TOML file would have."""
    text = text.strip()
    if type_name.startswith("tuple"):
        if text.startswith("["):
            try:
                return tomllib.loads(f"v = {text}")["v"]
            except tomllib.TOMLDecodeError:
                raise SettingsError(key, "must be a TOML list or comma-separated values") from None
        return [item.strip() for item in text.split(",") if item.strip()]
    if type_name == "bool":
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise SettingsError(key, "must be true or false")
    if type_name in ("int", "float", "int | str"):
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text) if type_name == "float" else text
        except ValueError:
            raise SettingsError(key, "must be a number") from None
    return text


def _coerce(key: str, type_name: str, value: Any) -> Any:
    if type_name == "str":
        if not isinstance(value, str):
            raise SettingsError(key, "must be a string")
        return value
    if type_name == "bool":
        if not isinstance(value, bool):
            raise SettingsError(key, "must be true or false")
        return value
    if type_name.startswith("tuple"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SettingsError(key, "must be a list of strings")
        return tuple(value)
    if type_name == "int | str":  # server.workers, database.publish_flights
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SettingsError(key, 'must be "auto" or a whole number of at least 1')
        return value
    is_int = type_name == "int"
    if isinstance(value, bool) or not isinstance(value, int | float) or (is_int and not isinstance(value, int)):
        raise SettingsError(key, "must be a whole number" if is_int else "must be a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise SettingsError(key, "must be a finite number")
    if value < 0 or (value == 0 and key not in ZERO_ALLOWED):
        raise SettingsError(key, "must be positive")
    return value if is_int else float(value)


def _build_channel_rules(raw: Any) -> tuple[ChannelRule, ...]:
    if not isinstance(raw, list):
        raise SettingsError("channels", "must be an array of tables ([[channels]])")
    rules = []
    for index, item in enumerate(raw):
        key = f"channels[{index}]"
        if not isinstance(item, dict):
            raise SettingsError(key, "must be a table")
        unknown = set(item) - {"pattern", "subscribe", "publish", "presence"}
        if unknown:
            raise SettingsError(f"{key}.{sorted(unknown)[0]}", "unknown key")
        if "pattern" not in item:
            raise SettingsError(f"{key}.pattern", "is required")
        pattern = _coerce(f"{key}.pattern", "str", item["pattern"])
        if not pattern:
            raise SettingsError(f"{key}.pattern", "must not be empty")
        rules.append(
            ChannelRule(
                pattern=pattern,
                subscribe=_coerce(f"{key}.subscribe", "tuple", item.get("subscribe", [])),
                publish=_coerce(f"{key}.publish", "tuple", item.get("publish", [])),
                presence=_coerce(f"{key}.presence", "bool", item.get("presence", False)),
            )
        )
    return tuple(rules)


ISSUER_FIELDS = {f.name: f for f in dataclasses.fields(IssuerSettings)}


def _build_issuers(raw: Any) -> tuple[IssuerSettings, ...]:
    """[[auth.issuers]]: each checked on its own here, against the others in _check_issuers."""
    if not isinstance(raw, list):
        raise SettingsError("auth.issuers", "must be an array of tables ([[auth.issuers]])")
    issuers = []
    for index, item in enumerate(raw):
        key = f"auth.issuers[{index}]"
        if not isinstance(item, dict):
            raise SettingsError(key, "must be a table")
        unknown = set(item) - set(ISSUER_FIELDS)
        if unknown:
            raise SettingsError(f"{key}.{sorted(unknown)[0]}", "unknown key")
        for name in ("issuer", "audience", "algorithms", "id_prefix"):
            if name not in item:
                raise SettingsError(f"{key}.{name}", "is required")
        values = {name: _coerce(f"{key}.{name}", ISSUER_FIELDS[name].type, value) for name, value in item.items()}
        issuers.append(_checked_issuer(key, IssuerSettings(**values)))
    return tuple(issuers)


def _checked_issuer(key: str, issuer: IssuerSettings) -> IssuerSettings:
    if not issuer.issuer:
        raise SettingsError(f"{key}.issuer", "must not be empty")
    if not issuer.audience:
        raise SettingsError(f"{key}.audience", "must not be empty")
    if not ID_PREFIX.fullmatch(issuer.id_prefix):
        raise SettingsError(f"{key}.id_prefix", "must be 1 to 63 characters of A-Z a-z 0-9 _ . @ - and then ':'")
    reserved = RESERVED_ROLES.intersection(issuer.allowed_roles)
    if reserved:
        raise SettingsError(f"{key}.allowed_roles", f"must not contain {sorted(reserved)[0]!r}")
    sources = [name for name in ISSUER_KEY_SOURCES if getattr(issuer, name)]
    if not sources:
        raise SettingsError(key, "needs one key: secret, public_key_file, jwks_file or jwks_url")
    if len(sources) > 1:
        raise SettingsError(f"{key}.{sources[1]}", f"only one key source per issuer ({sources[0]} is set)")
    if not issuer.algorithms:
        raise SettingsError(f"{key}.algorithms", "must list at least one algorithm")
    hmac = sources[0] == "secret"
    allowed = ISSUER_HMAC_ALGORITHMS if hmac else ISSUER_KEY_ALGORITHMS
    for algorithm in issuer.algorithms:
        if algorithm not in allowed:
            needs = "a public key (public_key_file, jwks_file, jwks_url)" if hmac else "secret"
            what = "unknown" if algorithm not in ISSUER_HMAC_ALGORITHMS + ISSUER_KEY_ALGORITHMS else f"needs {needs}"
            raise SettingsError(f"{key}.algorithms", f"{algorithm!r}: {what}; {sources[0]} takes {', '.join(allowed)}")
    if hmac and len(issuer.secret.encode()) < ISSUER_MIN_SECRET_BYTES:
        raise SettingsError(f"{key}.secret", f"must be at least {ISSUER_MIN_SECRET_BYTES} bytes")
    if issuer.jwks_url and not issuer.jwks_url.startswith(("https://", "http://")):
        raise SettingsError(f"{key}.jwks_url", "must be an http:// or https:// URL")
    for name in ("public_key_file", "jwks_file"):
        path = getattr(issuer, name)
        if path and not Path(path).is_file():
            raise SettingsError(f"{key}.{name}", f"{path!r} is not a readable file")
    return issuer


def _check_issuers(auth: AuthSettings) -> None:
    seen_issuers: set[str] = {auth.jwt_issuer}
    seen_prefixes: set[str] = set()
    for index, issuer in enumerate(auth.issuers):
        if issuer.issuer in seen_issuers:
            also = "auth.jwt_issuer" if issuer.issuer == auth.jwt_issuer else "another issuer"
            raise SettingsError(f"auth.issuers[{index}].issuer", f"{issuer.issuer!r} is already used by {also}")
        if issuer.id_prefix in seen_prefixes:
            raise SettingsError(f"auth.issuers[{index}].id_prefix", f"{issuer.id_prefix!r} is used by another issuer")
        seen_issuers.add(issuer.issuer)
        seen_prefixes.add(issuer.id_prefix)
        from server.identity.issuers import check_issuer_keys  # here: it needs the settings types

        check_issuer_keys(index, issuer)


def _check_cross_field(settings: Settings) -> None:
    if not 1 <= settings.server.port <= 65535:
        raise SettingsError("server.port", "must be between 1 and 65535")
    if settings.database.url and not settings.database.url.startswith(("postgresql://", "postgres://")):
        raise SettingsError("database.url", "must be a postgresql:// URL")
    schema = settings.database.schema
    if not SCHEMA_NAME.fullmatch(schema) or schema.startswith("pg_"):
        raise SettingsError(
            "database.schema", "must be 1 to 48 characters of a-z 0-9 _, not starting with a digit or pg_"
        )
    auth = settings.auth
    if auth.jwt_algorithm not in JWT_ALGORITHMS:
        raise SettingsError("auth.jwt_algorithm", f"must be one of {', '.join(JWT_ALGORITHMS)}")
    if not auth.jwt_algorithm.startswith("HS") and not (auth.jwt_private_key_file or auth.jwt_public_key_file):
        raise SettingsError("auth.jwt_public_key_file", f"is required with {auth.jwt_algorithm}")
    _check_issuers(auth)
    if not 4 <= auth.bcrypt_rounds <= 31:
        raise SettingsError("auth.bcrypt_rounds", "must be between 4 and 31")
    if settings.limits.burst < 1:
        raise SettingsError("limits.burst", "must be at least 1")
    if not 1 <= settings.limits.json_depth <= MAX_JSON_DEPTH:
        raise SettingsError("limits.json_depth", f"must be between 1 and {MAX_JSON_DEPTH}")
    for proxy in settings.server.trusted_proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise SettingsError("server.trusted_proxies", f"{proxy!r} is not an IP address or CIDR") from None
    for origin in settings.cors.origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise SettingsError("cors.origins", f"{origin!r} must start with http:// or https://")
