"""shared/settings.py: typed env parsing, validation that names the variable, --help, exit 2."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import pytest

from agents.guide.settings import PREFIX as GUIDE_PREFIX
from agents.guide.settings import GuideSettings
from services.eviction_worker.settings import PREFIX as EVICTION_PREFIX
from services.eviction_worker.settings import EvictionSettings
from services.gateway.settings import PREFIX as GATEWAY_PREFIX
from services.gateway.settings import GatewaySettings
from services.post_office_api.settings import PREFIX as API_PREFIX
from services.post_office_api.settings import ApiSettings
from services.traffic_cop_stub.settings import PREFIX as TC_PREFIX
from services.traffic_cop_stub.settings import TrafficCopSettings
from shared.settings import (
    COMMON_VARIABLES,
    LOG_LEVELS,
    MIN_PRODUCTION_KEY_LENGTH,
    ProcessSettings,
    ServiceSettings,
    SettingsError,
    format_help,
    load,
    load_or_exit,
    masked_repr,
    port_setting,
    setting,
)
from tests.helpers import PRODUCTION_ENV, ROOT, timeout

P = "DEMO_"


@dataclass(frozen=True, repr=False)
class Demo:
    name: str = setting("demo", "a string")
    count: int = setting(3, "an integer", minimum=1, maximum=10)
    ratio: float = setting(0.5, "a number", minimum=0, maximum=1)
    enabled: bool = setting(False, "a boolean")
    tags: tuple[str, ...] = setting(("a", "b"), "a comma-separated list")
    limit: int | None = setting(None, "an optional integer")
    mode: str = setting("fast", "a choice", choices=("fast", "slow"))
    password: str = setting("hunter2", "a secret", secret=True)
    redis_url: str = setting("redis://default", "shared by the stack", common=True)

    __repr__ = masked_repr


def test_defaults_when_nothing_is_set():
    s = load(Demo, P, {})
    assert s == Demo()
    assert (s.name, s.count, s.ratio, s.enabled, s.tags, s.limit, s.mode) == (
        "demo",
        3,
        0.5,
        False,
        ("a", "b"),
        None,
        "fast",
    )


def test_every_type_is_parsed():
    s = load(
        Demo,
        P,
        {
            "DEMO_NAME": "x y",
            "DEMO_COUNT": " 1_0 ",
            "DEMO_RATIO": "0.25",
            "DEMO_ENABLED": "yes",
            "DEMO_TAGS": " guide, pillar:content ,,",
            "DEMO_LIMIT": "7",
            "DEMO_MODE": "slow",
            "DEMO_PASSWORD": "s3cret",
        },
    )
    assert s.name == "x y"
    assert s.count == 10
    assert s.ratio == 0.25
    assert s.enabled is True
    assert s.tags == ("guide", "pillar:content")
    assert s.limit == 7
    assert s.mode == "slow"
    assert s.password == "s3cret"
    assert load(Demo, P, {"DEMO_LIMIT": ""}).limit is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True),
        ("true", True),
        ("ON", True),
        ("Yes", True),
        ("0", False),
        ("false", False),
        ("off", False),
        (" no ", False),
    ],
)
def test_booleans(raw, expected):
    assert load(Demo, P, {"DEMO_ENABLED": raw}).enabled is expected


@pytest.mark.parametrize(
    ("var", "raw", "fragment"),
    [
        ("DEMO_COUNT", "three", "expected an integer"),
        ("DEMO_COUNT", "1.5", "expected an integer"),
        ("DEMO_RATIO", "half", "expected a number"),
        ("DEMO_RATIO", "nan", "expected a finite number"),
        ("DEMO_RATIO", "inf", "expected a finite number"),
        ("DEMO_ENABLED", "maybe", "expected a boolean"),
        ("DEMO_LIMIT", "x", "expected an integer"),
        ("DEMO_COUNT", "0", "must be at least 1"),
        ("DEMO_COUNT", "11", "must be at most 10"),
        ("DEMO_RATIO", "-0.1", "must be at least 0"),
        ("DEMO_MODE", "medium", "must be one of fast, slow"),
    ],
)
def test_bad_values_name_the_variable_and_value(var, raw, fragment):
    with pytest.raises(SettingsError) as info:
        load(Demo, P, {var: raw})
    message = str(info.value)
    assert var in message
    assert fragment in message
    assert repr(raw) in message or raw.strip() in message


def test_bounds_are_inclusive():
    assert load(Demo, P, {"DEMO_COUNT": "1"}).count == 1
    assert load(Demo, P, {"DEMO_COUNT": "10"}).count == 10
    assert load(Demo, P, {"DEMO_RATIO": "1"}).ratio == 1.0


def test_unknown_prefixed_variable_is_refused():
    with pytest.raises(SettingsError) as info:
        load(Demo, P, {"DEMO_CUONT": "3", "DEMO_ZZZ": "1", "OTHER_THING": "ignored"})
    message = str(info.value)
    assert "DEMO_CUONT" in message and "DEMO_ZZZ" in message
    assert "OTHER_THING" not in message
    assert "--help" in message


def test_common_variable_unprefixed_and_prefixed_wins():
    assert load(Demo, P, {"REDIS_URL": "redis://common"}).redis_url == "redis://common"
    both = {"REDIS_URL": "redis://common", "DEMO_REDIS_URL": "redis://own"}
    assert load(Demo, P, both).redis_url == "redis://own"
    # A non-common field does not read the unprefixed name.
    assert load(Demo, P, {"COUNT": "9"}).count == 3


def test_common_variables_with_the_service_prefix_are_not_unknown():
    # TRAFFIC_COP_URL and TRAFFIC_COP_SERVICE_KEY are stack-wide; Traffic Cop must not choke.
    assert "TRAFFIC_COP_URL" in COMMON_VARIABLES
    s = load(TrafficCopSettings, TC_PREFIX, {"TRAFFIC_COP_URL": "http://127.0.0.1:8300"})
    assert s.port == 8300


def test_secrets_are_masked_in_repr():
    s = load(Demo, P, {"DEMO_PASSWORD": "very-secret-value"})
    text = repr(s)
    assert "very-secret-value" not in text
    assert "password='***'" in text
    assert "name='demo'" in text
    tc = load(TrafficCopSettings, TC_PREFIX, {"TRAFFIC_COP_SERVICE_KEY": "k-123456"})
    assert "k-123456" not in repr(tc) and "k-123456" not in str(tc)


def test_mutable_default_is_refused():
    with pytest.raises(TypeError):
        setting([], "a list")


def test_cross_field_validation_names_both_variables():
    with pytest.raises(SettingsError) as info:
        load(
            TrafficCopSettings,
            TC_PREFIX,
            {"TRAFFIC_COP_DEFAULT_TTL_SECONDS": "100", "TRAFFIC_COP_MAX_TTL_SECONDS": "10"},
        )
    assert "TRAFFIC_COP_DEFAULT_TTL_SECONDS" in str(info.value)
    assert "TRAFFIC_COP_MAX_TTL_SECONDS" in str(info.value)
    with pytest.raises(SettingsError, match="LOG_LEVEL"):
        load(TrafficCopSettings, TC_PREFIX, {"LOG_LEVEL": "LOUD"})
    with pytest.raises(SettingsError, match="TRAFFIC_COP_SERVICE_KEY"):
        load(TrafficCopSettings, TC_PREFIX, {"TRAFFIC_COP_SERVICE_KEY": ""})


def test_production_refuses_development_keys_without_showing_them():
    env = {**PRODUCTION_ENV, "TRAFFIC_COP_SERVICE_KEY": "dev-traffic_cop"}
    with pytest.raises(SettingsError) as info:
        load(TrafficCopSettings, TC_PREFIX, env)
    assert "TRAFFIC_COP_SERVICE_KEY" in str(info.value)
    assert "dev-traffic_cop" not in str(info.value)
    # The default key is a development key too.
    with pytest.raises(SettingsError):
        load(TrafficCopSettings, TC_PREFIX, dict(PRODUCTION_ENV))
    real_key = "r" * MIN_PRODUCTION_KEY_LENGTH
    ok = load(TrafficCopSettings, TC_PREFIX, {**env, "TRAFFIC_COP_SERVICE_KEY": real_key})
    assert ok.environment == "production"
    with pytest.raises(SettingsError, match="must be one of development, production"):
        load(TrafficCopSettings, TC_PREFIX, {"ENVIRONMENT": "staging"})


def test_format_help_lists_every_field():
    text = format_help(Demo, P, "Demo service.")
    assert text.startswith("Demo service.")
    for field in dataclasses.fields(Demo):
        assert P + field.name.upper() in text
        assert field.metadata["help"] in text
    assert "DEMO_REDIS_URL (or REDIS_URL)" in text
    assert "'a,b'" in text  # tuples shown as the env value that produces them
    assert "hunter2" not in text  # secret defaults are not printed


def test_load_or_exit_arguments(capsys):
    with pytest.raises(SystemExit) as info:
        load_or_exit(Demo, P, "Demo.", ["--help"])
    assert info.value.code == 0
    assert "DEMO_COUNT" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        load_or_exit(Demo, P, "Demo.", ["--port", "1"])
    assert info.value.code == 2
    assert "unexpected arguments" in capsys.readouterr().err


def _clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(TC_PREFIX) and k not in COMMON_VARIABLES
    }
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def _run_traffic_cop(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.traffic_cop_stub", *args],
        env=_clean_env(**env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout(30),
        check=False,
    )


def test_help_subprocess_lists_every_setting_with_default_and_meaning():
    result = _run_traffic_cop("--help")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for field in dataclasses.fields(TrafficCopSettings):
        var = TC_PREFIX + field.name.upper()
        line = next((ln for ln in out.splitlines() if ln.strip().startswith(var + " ")), None)
        assert line is not None, f"{var} missing from --help:\n{out}"
        assert "default" in line
        if not field.metadata.get("secret"):
            # A list shows as its variable's form, comma-separated.
            default = field.default
            shown = ",".join(default) if isinstance(default, tuple) else default
            assert repr(shown) in line
        assert field.metadata["help"] in out
    assert "(or REDIS_URL)" in out
    assert "dev-traffic_cop" not in out


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"TRAFFIC_COP_PORT": "eighty"}, "TRAFFIC_COP_PORT='eighty': expected an integer"),
        ({"TRAFFIC_COP_PORT": "70000"}, "TRAFFIC_COP_PORT=70000: must be at most 65535"),
        ({"TRAFFIC_COP_MAX_TTL": "5"}, "unknown setting(s) TRAFFIC_COP_MAX_TTL"),
        (
            {**PRODUCTION_ENV, "TRAFFIC_COP_SERVICE_KEY": "dev-traffic_cop"},
            "TRAFFIC_COP_SERVICE_KEY: a development key",
        ),
    ],
)
def test_bad_environment_exits_2_with_a_clear_message(env, fragment):
    result = _run_traffic_cop(**env)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "invalid settings:" in result.stderr
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr
    assert "dev-traffic_cop" not in result.stderr


# --- the shared base: ServiceSettings and ProcessSettings ---------------------------------

SERVICES: list[tuple[type[ServiceSettings], str, int]] = [
    (GatewaySettings, GATEWAY_PREFIX, 8100),
    (ApiSettings, API_PREFIX, 8200),
    (TrafficCopSettings, TC_PREFIX, 8300),
    (EvictionSettings, EVICTION_PREFIX, 8400),
]
SHARED_FIELDS = [f.name for f in dataclasses.fields(ServiceSettings)]
LONG_KEY = "k" * MIN_PRODUCTION_KEY_LENGTH


@dataclass(frozen=True, repr=False)
class DemoService(ServiceSettings):
    PREFIX = "DEMOSVC_"
    INSTANCE_NAME = "demo"

    port: int = port_setting(9999)
    api_key: str = setting("dev-demo", "a key", secret=True)

    def validate(self) -> None:
        super().validate()
        self.refuse_development_keys("DEMOSVC_API_KEY", (self.api_key,))


def test_the_shared_fields_are_declared_once_in_the_base():
    assert SHARED_FIELDS == [
        "host",
        "port",
        "advertise_host",
        "instance_id",
        "redis_url",
        "redis_sentinels",
        "redis_sentinel_master",
        "redis_sentinel_password",
        "redis_epoch_check_seconds",
        "consul_url",
        "shutdown_timeout",
        "log_level",
        "environment",
    ]
    for cls, prefix, port in SERVICES:
        assert issubclass(cls, ServiceSettings)
        assert prefix == cls.PREFIX
        names = [f.name for f in dataclasses.fields(cls)]
        assert names[: len(SHARED_FIELDS)] == SHARED_FIELDS, cls
        # PREFIX and INSTANCE_NAME are no settings, even to code reading the raw field table.
        assert list(cls.__dataclass_fields__) == names
        defaults = load(cls, prefix, {})
        assert defaults.port == port  # redeclared: the subclass's default, the base's place
        assert defaults.host == "127.0.0.1"
        assert defaults.shutdown_timeout == 10.0
        assert defaults.environment == "development"
        # One declaration: the same variable names and rules for every service.
        s = load(
            cls,
            prefix,
            {
                "REDIS_URL": "redis://shared:6379/0",
                "CONSUL_URL": "http://consul:8500",
                "LOG_LEVEL": "debug",
                f"{prefix}ADVERTISE_HOST": "svc.internal",
                f"{prefix}SHUTDOWN_TIMEOUT": "2.5",
            },
        )
        assert (s.redis_url, s.consul_url, s.log_level) == (
            "redis://shared:6379/0",
            "http://consul:8500",
            "debug",
        )
        assert (s.advertised_host, s.shutdown_timeout) == ("svc.internal", 2.5)


def test_the_guide_agent_has_the_process_fields_but_no_listener():
    names = {f.name for f in dataclasses.fields(GuideSettings)}
    assert issubclass(GuideSettings, ProcessSettings)
    assert not issubclass(GuideSettings, ServiceSettings)
    assert {"log_level", "environment"} <= names
    assert not names & {"host", "port", "advertise_host", "instance_id", "shutdown_timeout"}
    with pytest.raises(SettingsError, match="unknown setting"):
        load(GuideSettings, GUIDE_PREFIX, {"GUIDE_AGENT_PORT": "1"})


@pytest.mark.parametrize("level", LOG_LEVELS)
def test_every_log_level_is_accepted_in_any_case(level):
    for cls, prefix, _port in SERVICES:
        assert load(cls, prefix, {"LOG_LEVEL": level.lower()}).log_level == level.lower()
    assert load(GuideSettings, GUIDE_PREFIX, {"LOG_LEVEL": level}).log_level == level


def test_a_bad_log_level_names_the_services_variable():
    allowed = "must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"
    for cls, prefix in [(c, p) for c, p, _ in SERVICES] + [(GuideSettings, GUIDE_PREFIX)]:
        with pytest.raises(SettingsError) as info:
            load(cls, prefix, {"LOG_LEVEL": "LOUD"})
        assert str(info.value) == f"{prefix}LOG_LEVEL='LOUD': {allowed}"


def test_the_environment_has_two_choices_everywhere():
    for cls, prefix in [(c, p) for c, p, _ in SERVICES] + [(GuideSettings, GUIDE_PREFIX)]:
        with pytest.raises(SettingsError, match="must be one of development, production"):
            load(cls, prefix, {"ENVIRONMENT": "staging"})


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        ("dev-demo", "a development key"),
        ("DEV-" + LONG_KEY, "a development key"),  # any case
        ("Dev-" + LONG_KEY, "a development key"),
        ("k" * (MIN_PRODUCTION_KEY_LENGTH - 1), f"at least {MIN_PRODUCTION_KEY_LENGTH} characters"),
    ],
)
def test_production_refuses_development_and_short_keys_without_showing_them(key, fragment):
    env = {**PRODUCTION_ENV, "DEMOSVC_API_KEY": key}
    with pytest.raises(SettingsError) as info:
        load(DemoService, "DEMOSVC_", env)
    message = str(info.value)
    assert message.startswith("DEMOSVC_API_KEY: ")
    assert fragment in message and "ENVIRONMENT=production" in message
    assert key not in message
    # The same key is fine in development, and a long random one in production.
    assert load(DemoService, "DEMOSVC_", {"DEMOSVC_API_KEY": key}).api_key == key
    ok = load(DemoService, "DEMOSVC_", {**env, "DEMOSVC_API_KEY": LONG_KEY})
    assert ok.production


@pytest.mark.parametrize(
    ("cls", "prefix", "env"),
    [
        (GatewaySettings, GATEWAY_PREFIX, {}),
        (EvictionSettings, EVICTION_PREFIX, {}),
        (ApiSettings, API_PREFIX, {"REALM_KEYS": f"{LONG_KEY}:smart_city"}),
        (TrafficCopSettings, TC_PREFIX, {}),
    ],
)
def test_every_service_refuses_a_development_traffic_cop_key_in_production(cls, prefix, env):
    base = {**PRODUCTION_ENV, **env}
    for key in ("dev-traffic_cop", "DEV-" + LONG_KEY, "short"):
        with pytest.raises(SettingsError, match="TRAFFIC_COP_SERVICE_KEY") as info:
            load(cls, prefix, {**base, "TRAFFIC_COP_SERVICE_KEY": key})
        assert key not in str(info.value)
    assert load(cls, prefix, {**base, "TRAFFIC_COP_SERVICE_KEY": LONG_KEY}).production


def test_the_guide_agent_refuses_development_and_short_realm_keys():
    env = dict(PRODUCTION_ENV)
    with pytest.raises(SettingsError, match="GUIDE_AGENT_REALM_KEY: a development key"):
        load(GuideSettings, GUIDE_PREFIX, env)
    with pytest.raises(SettingsError, match="at least 32 characters"):
        load(GuideSettings, GUIDE_PREFIX, {**env, "GUIDE_AGENT_REALM_KEY": "short"})
    assert load(GuideSettings, GUIDE_PREFIX, {**env, "GUIDE_AGENT_REALM_KEY": LONG_KEY})


@pytest.mark.parametrize(
    ("host", "advertise", "expected"),
    [
        ("127.0.0.1", "", "127.0.0.1"),
        ("10.0.0.5", "", "10.0.0.5"),
        ("0.0.0.0", "", socket.gethostname()),
        ("::", "", socket.gethostname()),
        ("", "", socket.gethostname()),
        ("0.0.0.0", "gw-1.internal", "gw-1.internal"),
    ],
)
def test_advertised_host_is_never_a_wildcard(host, advertise, expected):
    for cls, prefix, _port in SERVICES:
        s = load(cls, prefix, {f"{prefix}HOST": host, f"{prefix}ADVERTISE_HOST": advertise})
        assert s.advertised_host == expected


def test_instance_defaults_to_the_service_name_hostname_and_port_or_pid():
    hostname = socket.gethostname()
    assert load(DemoService, "DEMOSVC_", {}).instance == f"demo-{hostname}-9999"
    assert load(GatewaySettings, GATEWAY_PREFIX, {}).instance == f"gateway-{hostname}-8100"
    assert load(ApiSettings, API_PREFIX, {}).instance == f"post-office-api-{hostname}-8200"
    assert load(TrafficCopSettings, TC_PREFIX, {}).instance == f"traffic-cop-{hostname}-8300"
    assert load(EvictionSettings, EVICTION_PREFIX, {}).instance == (
        f"eviction-{hostname}-{os.getpid()}"
    )
    for cls, prefix, _port in SERVICES:
        assert load(cls, prefix, {f"{prefix}INSTANCE_ID": "mine"}).instance == "mine"


def test_base_help_lists_shared_fields_with_the_subclass_defaults():
    text = format_help(DemoService, "DEMOSVC_", "Demo.")
    assert "DEMOSVC_PORT  default 9999" in text
    assert "DEMOSVC_LOG_LEVEL (or LOG_LEVEL)  default 'INFO'" in text
    assert "DEMOSVC_ADVERTISE_HOST  default ''" in text
    assert "dev-demo" not in text
    assert "api_key='***'" in repr(load(DemoService, "DEMOSVC_", {}))


def _fields_of(cls: type[Any]) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls)}


def test_traffic_cop_registers_its_advertised_address():
    assert "advertise_host" in _fields_of(TrafficCopSettings)
    s = load(
        TrafficCopSettings,
        TC_PREFIX,
        {"TRAFFIC_COP_HOST": "0.0.0.0", "TRAFFIC_COP_ADVERTISE_HOST": "traffic-cop"},
    )
    assert s.advertised_host == "traffic-cop"


@pytest.mark.parametrize(
    ("cls", "prefix"),
    [
        ("services.gateway.settings:GatewaySettings", "GATEWAY_"),
        ("services.post_office_api.settings:ApiSettings", "POST_OFFICE_"),
        ("services.eviction_worker.settings:EvictionSettings", "EVICTION_"),
    ],
)
@pytest.mark.parametrize("channels", ["events", "queue:x", "guide,guide", "a b", "x:y:z", "*"])
def test_every_service_refuses_the_same_unsafe_channel_names(cls, prefix, channels):
    # websocket:<channel> must never reach another Redis name (websocket:events, queues...),
    # and the three services that list channels must agree on what a channel name is.
    import importlib

    module, name = cls.split(":")
    settings_class = getattr(importlib.import_module(module), name)
    with pytest.raises(SettingsError, match=f"{prefix}CHANNELS"):
        load(settings_class, prefix, {f"{prefix}CHANNELS": channels})
    assert load(settings_class, prefix, {f"{prefix}CHANNELS": "guide,pillar:content"})


@pytest.mark.parametrize(
    ("cls", "prefix"),
    [
        ("services.gateway.settings:GatewaySettings", "GATEWAY_"),
        ("services.post_office_api.settings:ApiSettings", "POST_OFFICE_"),
        ("services.eviction_worker.settings:EvictionSettings", "EVICTION_"),
        ("agents.guide.settings:GuideSettings", "GUIDE_AGENT_"),
    ],
)
def test_one_channels_variable_sets_every_process(cls, prefix):
    # A channel the gateways accept but the worker does not drain stalls for good once one
    # message is queued, so the stack reads one unprefixed CHANNELS; a prefixed one still wins.
    import importlib

    module, name = cls.split(":")
    settings_class = getattr(importlib.import_module(module), name)
    assert load(settings_class, prefix, {"CHANNELS": "guide,extra"}).channels == ("guide", "extra")
    both = {"CHANNELS": "guide,extra", f"{prefix}CHANNELS": "guide"}
    assert load(settings_class, prefix, both).channels == ("guide",)


@pytest.mark.parametrize(
    "key",
    [
        "dev\u2010" + LONG_KEY,  # U+2010 HYPHEN: looks like dev-
        "dev\u2013" + LONG_KEY,  # EN DASH
        "dev\uff0d" + LONG_KEY,  # FULLWIDTH HYPHEN-MINUS (NFKC folds it)
        "\uff24\uff45\uff56-" + LONG_KEY,  # fullwidth "Dev"
        " dev-" + LONG_KEY,  # a leading space
        "dev-" + LONG_KEY + " ",
    ],
)
def test_production_refuses_development_key_lookalikes(key):
    with pytest.raises(SettingsError, match="a development key") as info:
        load(DemoService, "DEMOSVC_", {**PRODUCTION_ENV, "DEMOSVC_API_KEY": key})
    assert key.strip() not in str(info.value)


@pytest.mark.parametrize("key", [" " + LONG_KEY, LONG_KEY + "\t", "k\u0435y" + LONG_KEY])
def test_production_refuses_keys_with_spaces_or_non_ascii(key):
    with pytest.raises(SettingsError, match="printable ASCII") as info:
        load(DemoService, "DEMOSVC_", {**PRODUCTION_ENV, "DEMOSVC_API_KEY": key})
    assert key.strip() not in str(info.value)
    assert load(DemoService, "DEMOSVC_", {"DEMOSVC_API_KEY": key}).api_key == key  # dev: fine


@pytest.mark.parametrize(
    ("cls", "prefix", "env"),
    [
        (GatewaySettings, GATEWAY_PREFIX, {}),
        (EvictionSettings, EVICTION_PREFIX, {}),
        (ApiSettings, API_PREFIX, {"REALM_KEYS": f"{LONG_KEY}:smart_city"}),
        (TrafficCopSettings, TC_PREFIX, {}),
    ],
)
def test_production_refuses_a_redis_url_without_password(cls, prefix, env):
    base = {**PRODUCTION_ENV, **env, "TRAFFIC_COP_SERVICE_KEY": LONG_KEY}
    for url in ("redis://127.0.0.1:6379/0", "redis://user@redis:6379", "unix:///tmp/r.sock"):
        with pytest.raises(SettingsError, match="needs a Redis password"):
            load(cls, prefix, {**base, "REDIS_URL": url})
    for url in ("rediss://:s3cret@redis:6380/0", "redis://po:s3cret@redis", "unix:///r?password=x"):
        assert load(cls, prefix, {**base, "REDIS_URL": url}).production
    assert not load(cls, prefix, {**env, "REDIS_URL": "redis://127.0.0.1"}).production


@pytest.mark.parametrize(
    ("cls", "prefix", "env"),
    [
        (GatewaySettings, GATEWAY_PREFIX, {}),
        (ApiSettings, API_PREFIX, {"REALM_KEYS": f"{LONG_KEY}:smart_city"}),
    ],
)
def test_production_refuses_a_plain_ws_public_url_but_for_localhost(cls, prefix, env):
    base = {**PRODUCTION_ENV, **env, "TRAFFIC_COP_SERVICE_KEY": LONG_KEY}
    with pytest.raises(SettingsError, match=r"PUBLIC_WS_URL=.*needs wss://"):
        load(cls, prefix, {**base, "PUBLIC_WS_URL": "ws://edge.example.com/ws"})
    for url in ("wss://edge.example.com/ws", "ws://localhost/ws", "ws://127.0.0.1:8100/ws", ""):
        assert load(cls, prefix, {**base, "PUBLIC_WS_URL": url}).production


def test_production_gateway_refuses_allowed_origins_unset_or_any():
    base = {**PRODUCTION_ENV, "TRAFFIC_COP_SERVICE_KEY": LONG_KEY}
    for origins in ("", "*", "https://app.example.com,*"):
        with pytest.raises(SettingsError, match="ALLOWED_ORIGINS: ENVIRONMENT=production"):
            load(GatewaySettings, GATEWAY_PREFIX, {**base, "ALLOWED_ORIGINS": origins})
    assert load(GatewaySettings, GATEWAY_PREFIX, base).allowed_origins == (
        "https://app.example.com",
    )
    assert load(GatewaySettings, GATEWAY_PREFIX, {"ALLOWED_ORIGINS": "*"}).allowed_origins


@pytest.mark.parametrize(
    ("settings_class", "prefix"),
    [(GatewaySettings, GATEWAY_PREFIX), (ApiSettings, API_PREFIX)],
)
def test_one_stream_bound_for_every_process_that_appends_to_the_streams(settings_class, prefix):
    # Gateways and the API append to the same agent streams: one STREAM_MAX_PENDING bounds both.
    assert load(settings_class, prefix, {}).stream_max_pending == 10000
    assert load(settings_class, prefix, {"STREAM_MAX_PENDING": "7"}).stream_max_pending == 7
    both = {"STREAM_MAX_PENDING": "7", f"{prefix}STREAM_MAX_PENDING": "3"}
    assert load(settings_class, prefix, both).stream_max_pending == 3
    with pytest.raises(SettingsError, match=f"{prefix}QUEUE_MAX_LENGTH"):
        load(settings_class, prefix, {f"{prefix}QUEUE_MAX_LENGTH": "5"})  # the old name: unknown
