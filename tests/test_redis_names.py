"""shared/redis_names.py: every name's exact format, and no key literal anywhere else."""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import pytest

from shared import redis_names as names
from tests.helpers import ROOT


def test_spec_table_formats():
    # The SPEC's "Redis names" table, verbatim.
    assert names.agent_channel("guide") == "websocket:guide"
    assert names.agent_channel("pillar:content") == "websocket:pillar:content"
    assert names.connection("ws_alice_0badf00d") == "websocket:connection:ws_alice_0badf00d"
    assert (
        names.connection_messages("ws_alice_0badf00d")
        == "websocket:connection:ws_alice_0badf00d:messages"
    )
    assert names.user_connections("alice") == "websocket:user:alice:connections"
    assert names.channel_connections("guide") == "websocket:channel:guide:connections"
    assert (
        names.channel_connections("pillar:insights")
        == "websocket:channel:pillar:insights:connections"
    )
    assert names.gateway_instance("gw-1") == "websocket:gateway:gw-1"
    assert names.EVENTS == "websocket:events"
    assert names.stream("guide") == "websocket:stream:{guide}"
    assert names.dead_letters("pillar:content") == "websocket:dead:{pillar:content}"
    assert names.stream_consumers("guide") == "websocket:consumers:{guide}"
    assert names.EPOCH == "websocket:epoch"
    digest = hashlib.sha256(b"token").hexdigest()
    assert names.session(digest) == f"session:{digest}"


def test_internal_names():
    assert names.LAST_SEEN == "websocket:connections:last_seen"
    assert names.GATEWAYS == "websocket:gateways"
    assert names.session_of_connection("ws_u_0000abcd") == "session:connection:ws_u_0000abcd"
    assert names.SESSION_REVOCATIONS == "session:revocations"
    assert names.channel_broadcast("guide") == "websocket:channel:guide:broadcast"
    assert names.gateway_connections("gw-1") == "websocket:gateway:gw-1:connections"
    assert names.gateway_control("gw-1") == "websocket:gateway:gw-1:control"
    assert names.session_connections("sess_0123456789abcdef") == (
        "session:sess_0123456789abcdef:connections"
    )
    assert names.session_by_id("sess_0123456789abcdef") == "session:id:sess_0123456789abcdef"


def test_templates_used_by_lua_scripts():
    # shared/registry.py passes names built with "{}" to its scripts, which substitute it.
    assert names.user_connections("{}").replace("{}", "bob") == names.user_connections("bob")
    assert names.gateway_control("{}").replace("{}", "gw") == names.gateway_control("gw")


def test_internal_names_do_not_collide_with_spec_names():
    # An agent channel named "events" or "gateways" would share a name with internal keys.
    internal = {names.EVENTS, names.EPOCH, names.LAST_SEEN, names.GATEWAYS}
    channels = (
        "guide",
        "pillar:content",
        "pillar:insights",
        "pillar:operations",
        "pillar:business_outcomes",
    )
    assert not internal & {names.agent_channel(c) for c in channels}
    # The session hash of a sha256 can never look like the internal session names.
    digest = hashlib.sha256(b"x").hexdigest()
    assert names.session(digest) not in {
        names.SESSION_REVOCATIONS,
    }


def test_every_public_builder_is_exported_and_pinned():
    public = {n for n in dir(names) if not n.startswith("_") and n not in {"annotations"}}
    assert public == set(names.__all__), "export every name, so the pins above stay complete"


_PREFIXES = ("websocket:", "session:")


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def key_literals(source: str) -> list[tuple[int, str]]:
    """(line, text) of every string constant or f-string that starts with a key prefix."""
    tree = ast.parse(source)
    skip = _docstring_nodes(tree)
    # An f-string's literal parts are Constants too; the JoinedStr is reported once instead.
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            skip.update(id(part) for part in node.values)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and id(node) not in skip:
            value = node.value
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            if isinstance(value, str) and value.startswith(_PREFIXES):
                found.append((node.lineno, value))
        elif isinstance(node, ast.JoinedStr) and node.values:
            first = node.values[0]
            if (
                isinstance(first, ast.Constant)
                and isinstance(first.value, str)
                and first.value.startswith(_PREFIXES)
            ):
                found.append((node.lineno, first.value + "{...}"))
    return found


def test_the_literal_finder_finds_what_it_should():
    src = '''
"""Module docstring mentioning websocket:events is fine."""
def f(x):
    """So is a function docstring: session:<hash>."""
    a = "websocket:events"
    b = f"session:{x}"
    c = b"websocket:guide"
    d = "a websocket: mention in the middle is fine"
    return a, b, c, d
'''
    found = [text for _, text in key_literals(src)]
    assert sorted(found) == ["session:{...}", "websocket:events", "websocket:guide"]


_SCANNED = ("services", "agents", "post_office_client")


def _python_files() -> list[Path]:
    files: list[Path] = []
    for top in _SCANNED:
        root = ROOT / top
        if root.is_dir():
            files.extend(p for p in sorted(root.rglob("*.py")) if ".venv" not in p.parts)
    return files


@pytest.mark.parametrize("path", _python_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_redis_key_literals_outside_shared(path: Path):
    try:
        source = path.read_text(encoding="utf-8")
        literals = key_literals(source)
    except SyntaxError:
        pytest.skip("file is being written (syntax error); other tests catch that")
    assert not literals, (
        f"{path.relative_to(ROOT)} spells Redis names itself; use shared/redis_names.py: {literals}"
    )
