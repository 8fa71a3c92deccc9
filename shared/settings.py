"""Typed, frozen settings read from environment variables.

Each service declares one frozen dataclass whose fields carry a help text through
:func:`setting`. :func:`load` reads ``<PREFIX><FIELD>`` for every field (for example
``GATEWAY_MAX_FRAME_BYTES``); fields marked ``common=True`` also accept the unprefixed name
(``REDIS_URL``), which the whole stack shares, with the prefixed one winning.

Validation happens once, at start: a bad value raises :class:`SettingsError` naming the
variable and the value; an unknown variable carrying the service's prefix is an error too,
because a misspelt limit that silently keeps its default is worse than a refusal to start.
Secret fields are masked in ``repr``.

What every process shares is declared once here: :class:`ProcessSettings` (``LOG_LEVEL``,
``ENVIRONMENT`` and the production refusal of development keys) for any process, and
:class:`ServiceSettings` (listen address, advertised address, instance id, Redis, Consul,
shutdown) for the services with a port. A service's dataclass subclasses one of them, sets
``PREFIX`` (for messages) and, for a service, ``INSTANCE_NAME``, and redeclares a field only to
change its default or help (``port: int = port_setting(8100)``).

Exception tree::

    ValueError
     └── SettingsError
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import socket
import sys
import types
import typing
import unicodedata
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from shared.protocol import DEFAULT_CHANNELS
from shared.redis_client import sentinel_target

__all__ = [
    "COMMON_VARIABLES",
    "DEV_KEY_PREFIX",
    "LOG_LEVELS",
    "LOOPBACK_HOSTS",
    "MIN_PRODUCTION_KEY_LENGTH",
    "RESERVED_CHANNEL_NAMES",
    "AgentStreamSettings",
    "ChannelSettings",
    "HttpLimitSettings",
    "ProcessSettings",
    "ServiceSettings",
    "SettingsError",
    "TaskHookSettings",
    "TrafficCopCallerSettings",
    "check_channel_names",
    "format_help",
    "instance_id_setting",
    "key_lookalike",
    "load",
    "load_or_exit",
    "port_setting",
    "redis_url_has_password",
    "setting",
]

T = TypeVar("T")

#: Unprefixed variables shared by the whole stack. They are never "unknown" to any service,
#: even when a service's own prefix happens to match (``TRAFFIC_COP_URL`` for Traffic Cop).
COMMON_VARIABLES = frozenset(
    {
        "REDIS_URL",
        "REDIS_SENTINELS",
        "REDIS_SENTINEL_MASTER",
        "REDIS_SENTINEL_PASSWORD",
        "REDIS_EPOCH_CHECK_SECONDS",
        "CONSUL_URL",
        "LOG_LEVEL",
        "ENVIRONMENT",
        "TRAFFIC_COP_URL",
        "POST_OFFICE_URL",
        "GATEWAY_URLS",
        "PUBLIC_WS_URL",
        "MAX_IDLE_SECONDS",
        "ALLOWED_ORIGINS",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "TRAFFIC_COP_SERVICE_KEY",
        "TRAFFIC_COP_FROM_CONSUL",
        "TRUSTED_PROXIES",
        "REALM_KEYS",
        "CHANNELS",
        "STREAM_MAX_PENDING",
    }
)


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names the variable."""


def setting(
    default: Any,
    help: str,
    *,
    secret: bool = False,
    common: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """Declare a settings field with its help text and validation rules."""
    metadata = {
        "help": help,
        "secret": secret,
        "common": common,
        "minimum": minimum,
        "maximum": maximum,
        "choices": choices,
    }
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed in settings; use a tuple")
    return dataclasses.field(default=default, metadata=metadata)


def _env_names(prefix: str, field: dataclasses.Field[Any]) -> list[str]:
    names = [prefix + field.name.upper()]
    if field.metadata.get("common"):
        names.append(field.name.upper())
    return names


def _parse(raw: str, kind: Any, name: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if raw.strip() == "":
            return None
        return _parse(raw, args[0], name)
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{name}={raw!r}: expected a boolean (true/false)")
    if kind is int:
        try:
            return int(raw.strip().replace("_", ""))
        except ValueError:
            raise SettingsError(f"{name}={raw!r}: expected an integer") from None
    if kind is float:
        try:
            number = float(raw.strip())
        except ValueError:
            raise SettingsError(f"{name}={raw!r}: expected a number") from None
        # nan slips past every minimum/maximum comparison and inf is no usable limit either.
        if not math.isfinite(number):
            raise SettingsError(f"{name}={raw!r}: expected a finite number")
        return number
    if kind is str:
        return raw
    if origin is tuple:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    raise SettingsError(f"{name}: unsupported setting type {kind!r}")


def _check(value: Any, field: dataclasses.Field[Any], name: str) -> None:
    meta = field.metadata
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if meta.get("minimum") is not None and value < meta["minimum"]:
            raise SettingsError(f"{name}={value!r}: must be at least {meta['minimum']}")
        if meta.get("maximum") is not None and value > meta["maximum"]:
            raise SettingsError(f"{name}={value!r}: must be at most {meta['maximum']}")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise SettingsError(f"{name}={value!r}: must be one of {', '.join(choices)}")


#: A channel is one or two segments of letters, digits, ``_`` and ``-`` (``guide``,
#: ``pillar:content``), so ``websocket:<channel>`` never reaches another Redis name.
_CHANNEL_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}(:[A-Za-z0-9_-]{1,64})?\Z")
#: First segments that are Redis names of their own under ``websocket:``.
RESERVED_CHANNEL_NAMES = frozenset(
    {
        "events",
        "epoch",
        "connection",
        "connections",
        "user",
        "channel",
        "gateway",
        "gateways",
        "queue",
        "stream",
        "dead",
        "consumers",
    }
)


def check_channel_names(variable: str, channels: tuple[str, ...]) -> None:
    """Raise :class:`SettingsError` for a channel name that is unsafe as a Redis name part."""
    for channel in channels:
        if not _CHANNEL_RE.match(channel):
            raise SettingsError(
                f"{variable}: {channel[:80]!r} is not a channel name (one or two ':'-separated "
                "segments of letters, digits, '_' and '-', at most 64 characters each)"
            )
        if channel.split(":", 1)[0].lower() in RESERVED_CHANNEL_NAMES:
            raise SettingsError(
                f"{variable}: {channel!r} collides with an internal Redis name; reserved first "
                f"segments: {', '.join(sorted(RESERVED_CHANNEL_NAMES))}"
            )
    if len(set(channels)) != len(channels):
        raise SettingsError(f"{variable}: a channel is listed twice")


def load(cls: type[T], prefix: str, environ: Mapping[str, str] | None = None) -> T:
    """Build ``cls`` from ``environ`` (default ``os.environ``), validating every value."""
    env = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    known: set[str] = set()
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        names = _env_names(prefix, field)
        known.update(names)
        raw = next((env[n] for n in names if n in env), None)
        used = next((n for n in names if n in env), names[0])
        value = field.default if raw is None else _parse(raw, hints[field.name], used)
        _check(value, field, used)
        values[field.name] = value
    unknown = sorted(
        name
        for name in env
        if name.startswith(prefix) and name not in known and name not in COMMON_VARIABLES
    )
    if unknown:
        raise SettingsError(
            f"unknown setting(s) {', '.join(unknown)}: see `--help` for the {prefix}* variables"
        )
    instance = cls(**values)
    validate = getattr(instance, "validate", None)
    if callable(validate):
        validate()
    # After the service's own checks, so that a development key is named before anything else.
    refuse = getattr(instance, "refuse_unsafe_production", None)
    if callable(refuse):
        refuse()
    return instance


def masked_repr(instance: Any) -> str:
    """``repr`` with secret fields replaced by ``'***'``; used as the dataclasses' ``__repr__``."""
    parts = []
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        shown = "'***'" if field.metadata.get("secret") and value else repr(value)
        parts.append(f"{field.name}={shown}")
    return f"{type(instance).__name__}({', '.join(parts)})"


def format_help(cls: type[Any], prefix: str, description: str) -> str:
    """The text of ``--help``: every variable, its default and meaning."""
    lines = [description, "", "Settings (environment variables):"]
    for field in dataclasses.fields(cls):
        names = _env_names(prefix, field)
        default = field.default
        shown = "(secret)" if field.metadata.get("secret") and default else repr(default)
        if isinstance(default, tuple):
            shown = repr(",".join(default))
        alias = f" (or {names[1]})" if len(names) > 1 else ""
        lines.append(f"  {names[0]}{alias}  default {shown}")
        lines.append(f"      {field.metadata.get('help', '')}")
    return "\n".join(lines)


def load_or_exit(cls: type[T], prefix: str, description: str, argv: list[str] | None = None) -> T:
    """Entry-point helper: print ``--help`` or the validation error and exit, else return
    settings."""
    args = sys.argv[1:] if argv is None else argv
    if "--help" in args or "-h" in args:
        print(format_help(cls, prefix, description))
        raise SystemExit(0)
    if args:
        print(
            f"unexpected arguments {args!r}; settings come from the environment, see --help",
            file=sys.stderr,
        )
        raise SystemExit(2)
    try:
        return load(cls, prefix)
    except SettingsError as exc:
        print(f"invalid settings: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


#: Levels ``LOG_LEVEL`` accepts (in any case).
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: Development keys start with this, in any case; ``ENVIRONMENT=production`` refuses them.
DEV_KEY_PREFIX = "dev-"
#: Production keys are at least this long (``openssl rand -hex 32`` gives 64 characters).
MIN_PRODUCTION_KEY_LENGTH = 32
#: Listen addresses that are no address another process can reach.
_ANY_ADDRESS = ("0.0.0.0", "::", "")
#: Hosts a plain ``ws://`` public URL may name in production: traffic that never leaves the
#: machine (the compose stack on a laptop); anything else must be ``wss://``.
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


def key_lookalike(key: str) -> str:
    """``key`` as a reader would see it: NFKC (fullwidth and compatibility forms folded), every
    Unicode dash (category Pd: U+2010 hyphen, en dash, ...) made ``-``, outer spaces stripped,
    case folded. ``dev\\u2010x`` and `` dev-x`` both become ``dev-x``."""
    folded = unicodedata.normalize("NFKC", key)
    dashes = "".join("-" if unicodedata.category(c) == "Pd" else c for c in folded)
    return dashes.strip().casefold()


def _printable_ascii(key: str) -> bool:
    return all("!" <= c <= "~" for c in key)


def redis_url_has_password(url: str) -> bool:
    """Whether a ``redis://``, ``rediss://`` or ``unix://`` URL carries a password (in the
    user information or as ``?password=``)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        return True
    return bool(urllib.parse.parse_qs(parts.query).get("password", [""])[0])


def port_setting(default: int, help: str = "port to listen on", *, minimum: int = 1) -> Any:
    """A listen port field; ``minimum=0`` lets the system pick a free port."""
    return setting(default, help, minimum=minimum, maximum=65535)


def instance_id_setting(default_shape: str, used_in: str = "logs and Consul") -> Any:
    """The instance id field; ``default_shape`` tells what an empty value becomes."""
    return setting("", f"this instance's id in {used_in}; empty: {default_shape}")


@dataclass(frozen=True, repr=False)
class ProcessSettings:
    """Settings of any Post Office process: log level and environment.

    Subclasses set ``PREFIX`` (their variables' prefix, named in messages) and extend
    :meth:`validate`, calling ``super().validate()`` first."""

    # Plain class attributes, not ClassVar annotations: those would show in
    # ``__dataclass_fields__``, which callers read as the list of settings.
    PREFIX = ""

    log_level: str = setting("INFO", "DEBUG, INFO, WARNING, ERROR or CRITICAL", common=True)
    environment: str = setting(
        "development",
        "development or production (production refuses development keys, 'dev-' in any case "
        f"or look-alike, keys shorter than {MIN_PRODUCTION_KEY_LENGTH} characters or not "
        "printable ASCII, a Redis URL without a password, a ws:// public URL but for "
        "localhost, and on the gateway ALLOWED_ORIGINS unset or '*')",
        common=True,
        choices=("development", "production"),
    )

    __repr__ = masked_repr

    @property
    def production(self) -> bool:
        return self.environment == "production"

    def validate(self) -> None:
        """Cross-field checks; raise :class:`SettingsError` naming the variable."""
        if self.log_level.upper() not in LOG_LEVELS:
            raise SettingsError(
                f"{self.PREFIX}LOG_LEVEL={self.log_level!r}: must be one of {', '.join(LOG_LEVELS)}"
            )

    def refuse_development_keys(self, variable: str, keys: Iterable[str]) -> None:
        """In production, refuse a development key (``dev-`` in any case) or a short one.

        The keys are secrets: the message names ``variable``, never a key."""
        if not self.production:
            return
        keys = tuple(keys)
        if any(key_lookalike(key).startswith(DEV_KEY_PREFIX) for key in keys):
            raise SettingsError(
                f"{variable}: a development key ('{DEV_KEY_PREFIX}...', in any case) is refused "
                "when ENVIRONMENT=production (no development keys in production); set a real "
                "random key"
            )
        if any(len(key) < MIN_PRODUCTION_KEY_LENGTH for key in keys):
            raise SettingsError(
                f"{variable}: ENVIRONMENT=production needs a key of at least "
                f"{MIN_PRODUCTION_KEY_LENGTH} characters"
            )
        if not all(_printable_ascii(key) for key in keys):
            # Spaces, tabs and non-ASCII letters: a key pasted with a stray space, or one made
            # to look like another (Cyrillic letters, Unicode dashes), is no random key.
            raise SettingsError(
                f"{variable}: ENVIRONMENT=production needs keys of printable ASCII without "
                "spaces (a leading or trailing space, or a non-ASCII character, was found)"
            )

    def refuse_unsafe_production(self) -> None:
        """In production, refuse settings that are only safe on a development machine.

        Called by :func:`load` after :meth:`validate`; subclasses extend it, calling
        ``super().refuse_unsafe_production()`` first."""

    def refuse_plain_public_url(self, variable: str, url: str) -> None:
        """In production, a public WebSocket URL must be ``wss://`` unless it names this
        machine (loopback): session tokens travel in it."""
        if not self.production or not url:
            return
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() == "ws" and (parts.hostname or "") not in LOOPBACK_HOSTS:
            raise SettingsError(
                f"{variable}={url!r}: ENVIRONMENT=production needs wss:// (session tokens "
                "travel in it); ws:// is only accepted for localhost"
            )


@dataclass(frozen=True, repr=False)
class ChannelSettings(ProcessSettings):
    """The stack's logical channels, declared once for every process that lists them (the
    gateways accept them, the API publishes and streams them, the worker reclaims and trims
    their streams, the guide agent names them): one unprefixed ``CHANNELS`` sets them all,
    since a channel the worker does not list is never trimmed nor reclaimed."""

    channels: tuple[str, ...] = setting(
        DEFAULT_CHANNELS,
        "comma-separated logical channels (clients use them, agents consume them, the worker "
        "reclaims and trims their streams); set CHANNELS once for the whole stack",
        common=True,
    )

    def validate(self) -> None:
        super().validate()
        if not self.channels:
            raise SettingsError(f"{self.PREFIX}CHANNELS: at least one channel is required")
        check_channel_names(f"{self.PREFIX}CHANNELS", self.channels)


@dataclass(frozen=True, repr=False)
class AgentStreamSettings(ProcessSettings):
    """The bound of the agent streams, declared once for the processes that append to them
    (the gateways with client messages, the API with what realms publish): one unprefixed
    ``STREAM_MAX_PENDING`` sets both, so a channel refuses at the same backlog whoever
    writes to it."""

    stream_max_pending: int = setting(
        10000,
        "unconsumed messages (not yet read, or read and not acked, by the slowest consumer "
        "group; all of them while no group exists) a channel's stream may hold; past it "
        "clients get error 'unavailable' and the API answers 503. Nothing accepted is trimmed "
        "before every group acked it; set STREAM_MAX_PENDING once for the whole stack",
        common=True,
        minimum=1,
    )


@dataclass(frozen=True, repr=False)
class TaskHookSettings(ProcessSettings):
    """The ``FAIL_TASKS`` test hook of a service with background tasks (each service lists
    this base): the supervision tests name a task, which then fails as it starts."""

    fail_tasks: str = setting(
        "",
        "test hook: comma-separated background task names that fail as they start, to show "
        "that /ready turns 503 and the process exits 1 (docs/operations.md lists the tasks); "
        "refused when ENVIRONMENT=production",
    )

    @property
    def failing_tasks(self) -> frozenset[str]:
        """The ``FAIL_TASKS`` test hook's task names."""
        return frozenset(name.strip() for name in self.fail_tasks.split(",") if name.strip())

    def validate(self) -> None:
        super().validate()
        if self.failing_tasks and self.production:
            raise SettingsError(
                f"{self.PREFIX}FAIL_TASKS is a test hook: refused when ENVIRONMENT=production"
            )


@dataclass(frozen=True, repr=False)
class _Endpoint:
    # Declared apart from ProcessSettings only so that --help lists these first: dataclass
    # fields come in reverse MRO order.
    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0 in containers)")
    port: int = port_setting(0, minimum=0)
    advertise_host: str = setting(
        "", "address registered in Consul (default: HOST, or the hostname when HOST is 0.0.0.0)"
    )
    instance_id: str = instance_id_setting("<service>-<hostname>-<port>")
    redis_url: str = setting(
        "redis://127.0.0.1:6379/0",
        "Redis URL; with REDIS_SENTINELS only its password, user and database number are used",
        common=True,
    )
    redis_sentinels: tuple[str, ...] = setting(
        (),
        "Redis Sentinel addresses, host:port comma-separated; set: the primary of "
        "REDIS_SENTINEL_MASTER is found (and followed through failovers) through them, "
        "instead of REDIS_URL's host",
        common=True,
    )
    redis_sentinel_master: str = setting(
        "", "the Sentinel master name (with REDIS_SENTINELS)", common=True
    )
    redis_sentinel_password: str = setting(
        "", "password of the sentinels themselves, if they require one", secret=True, common=True
    )
    redis_epoch_check_seconds: float = setting(
        2.0,
        "how often the Redis epoch key is checked to notice that Redis lost its data (an empty "
        "restart, a failover to a replica without it); also checked at every reconnect",
        common=True,
        minimum=0.05,
        maximum=300.0,
    )
    consul_url: str = setting(
        "",
        "Consul agent to register with (and look services up in); empty: no registration, "
        "environment fallback",
        common=True,
    )
    shutdown_timeout: float = setting(
        10.0,
        "on SIGTERM, how long in-flight work (requests, the worker's current pass) may take to "
        "finish before exiting",
        minimum=0.0,
    )


@dataclass(frozen=True, repr=False)
class ServiceSettings(ProcessSettings, _Endpoint):
    """Settings of a service with a port, registered in Consul.

    Subclasses set ``INSTANCE_NAME`` (the first part of the default instance id) and redeclare
    ``port`` with their default."""

    INSTANCE_NAME = "service"

    def refuse_unsafe_production(self) -> None:
        super().refuse_unsafe_production()
        if self.production and not redis_url_has_password(self.redis_url):
            # The URL holds the password: never echo it (here it has none, but say only why).
            raise SettingsError(
                f"{self.PREFIX}REDIS_URL (or REDIS_URL): ENVIRONMENT=production needs a Redis "
                "password (redis://:PASSWORD@host:6379/0 or ?password=)"
            )

    def validate(self) -> None:
        super().validate()
        if bool(self.redis_sentinels) != bool(self.redis_sentinel_master):
            raise SettingsError(
                "REDIS_SENTINELS and REDIS_SENTINEL_MASTER go together: set both, or neither "
                "(then REDIS_URL is used)"
            )
        for address in self.redis_sentinels:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise SettingsError(f"REDIS_SENTINELS: {address!r} is not host:port")

    @property
    def redis_target(self) -> str:
        """What :func:`shared.redis_client.make_redis` takes: ``REDIS_URL``, or the Sentinel
        target built from ``REDIS_SENTINELS`` and ``REDIS_SENTINEL_MASTER``."""
        if not self.redis_sentinels:
            return self.redis_url
        return sentinel_target(
            self.redis_sentinels,
            self.redis_sentinel_master,
            self.redis_url,
            self.redis_sentinel_password,
        )

    @property
    def instance(self) -> str:
        return self.instance_id or f"{self.INSTANCE_NAME}-{socket.gethostname()}-{self.port}"

    @property
    def advertised_host(self) -> str:
        """The address other processes (and Consul's check) reach this one at, never 0.0.0.0."""
        if self.advertise_host:
            return self.advertise_host
        return socket.gethostname() if self.host in _ANY_ADDRESS else self.host


@dataclass(frozen=True, repr=False)
class HttpLimitSettings:
    """What a service's HTTP server bounds before any handler runs, and its per-address
    budget for unauthenticated work (shared/http_server.py, shared/address_budget.py).

    A mixin listed first (``class Settings(HttpLimitSettings, ServiceSettings)``), so that
    its fields follow the shared ones."""

    http_header_timeout_seconds: float = setting(
        10.0,
        "a new connection must send a whole request head (a WebSocket upgrade included) within "
        "this, or it is answered 408 and closed",
        minimum=0.1,
    )
    http_body_timeout_seconds: float = setting(
        30.0, "a request body must arrive within this, or the request is answered 408", minimum=0.1
    )
    http_keepalive_timeout_seconds: float = setting(
        75.0,
        "an idle kept-alive connection (or one whose next request head is incomplete) is "
        "closed after this; keep it above the proxy's idle timeout",
        minimum=0.1,
    )
    http_max_pending_connections: int = setting(
        1000,
        "connections held that have not yet sent a whole request head; past it a new one is "
        "answered 503 and closed at once",
        minimum=1,
    )
    http_max_header_bytes: int = setting(
        8190, "longest request line and longest header line (past it: 400)", minimum=1024
    )
    http_max_headers: int = setting(128, "most headers in a request (past it: 400)", minimum=8)
    unauth_rate_per_second: float = setting(
        10.0,
        "per client address: requests refused for their credentials, and gateway upgrades "
        "before their token is checked, allowed per second on average (token bucket); past it "
        "429 with Retry-After",
        minimum=0.001,
    )
    unauth_burst: int = setting(
        50, "per client address: how many of those may come at once", minimum=1
    )
    unauth_addresses: int = setting(
        100000,
        "client addresses whose budget is remembered (the least recently seen are forgotten)",
        minimum=1,
    )
    trusted_proxies: str = setting(
        "",
        "comma-separated addresses or networks (CIDR) of proxies whose X-Forwarded-For names "
        "the client address; empty: the peer address is the client's",
        common=True,
    )

    @property
    def trusted_proxy_list(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.trusted_proxies.split(",") if p.strip())

    def validate(self) -> None:
        super().validate()  # type: ignore[misc]  # the ServiceSettings it is mixed into
        for proxy in self.trusted_proxy_list:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise SettingsError(
                    f"TRUSTED_PROXIES: {proxy!r} is not an IP address or network (CIDR)"
                ) from None


@dataclass(frozen=True, repr=False)
class TrafficCopCallerSettings(ServiceSettings):
    """A service that calls Traffic Cop's internal API (the gateway, the API, the worker).

    Each subclass still refuses a development key in production in its own :meth:`validate`,
    since whether the key is used at all differs (the API may run without Traffic Cop)."""

    traffic_cop_url: str = setting(
        "http://127.0.0.1:8300",
        "Traffic Cop base URL (Consul is asked instead only with TRAFFIC_COP_FROM_CONSUL)",
        common=True,
    )
    traffic_cop_service_key: str = setting(
        "dev-traffic_cop", "bearer key for Traffic Cop's internal API", secret=True, common=True
    )
    traffic_cop_timeout_seconds: float = setting(
        2.0, "timeout of one Traffic Cop call", minimum=0.05
    )
    traffic_cop_from_consul: bool = setting(
        False,
        "look Traffic Cop up in Consul rather than use TRAFFIC_COP_URL; only with a Consul "
        "whose ACLs stop other services registering as traffic-cop (its calls carry the "
        "service key and session tokens)",
        common=True,
    )
