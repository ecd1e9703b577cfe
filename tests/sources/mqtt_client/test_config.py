"""Options of the mqtt-client source: validated when the configuration is loaded, not at the first message."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from isthmus.config import SourceConfig, load_config
from isthmus.errors import ConfigError
from isthmus.plugins import parse_options
from isthmus.runtime.supervisor import Runtime
from isthmus.sources.mqtt_client import PLUGIN, MqttClientOptions, Route, Subscription, Template

DOC = Path(__file__).parents[3] / "docs" / "mqtt-client.md"
SUB = {"filter": "pebble/+/data", "device": "pebble/{device}/data"}


def options(**kw: Any) -> MqttClientOptions:
    return parse_options(MqttClientOptions, {"url": "mqtt://broker", "subscriptions": [SUB], **kw}, "source 'x'")


def test_defaults() -> None:
    o = options()
    assert (o.host, o.port, o.tls, o.protocol) == ("broker", 1883, False, "5")
    assert (o.keepalive, o.session_expiry, o.reconnect_min, o.reconnect_max) == (30, 86400, 1.0, 60.0)
    assert o.policy == "accept" and o.client_id is None
    sub = o.subscriptions[0]
    assert (sub.qos, sub.decoder, sub.kind, sub.device_field) == (1, "thingsboard", "telemetry", None)
    assert options(url="mqtts://b:9999", protocol=5).port == 9999
    assert options(url="mqtts://[::1]").host == "::1" and options(url="mqtts://[::1]").port == 8883


def test_every_option_is_documented() -> None:
    assert PLUGIN.config is MqttClientOptions
    for model in (MqttClientOptions, Subscription):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
    doc = DOC.read_text(encoding="utf-8")
    for name in [*MqttClientOptions.model_fields, *Subscription.model_fields]:
        assert f"| `{name}` |" in doc, f"docs/mqtt-client.md has no table row for {name}"


def test_the_documented_example_is_a_valid_configuration(tmp_path: Path) -> None:
    example = DOC.read_text(encoding="utf-8").split("```toml\n", 1)[1].split("```", 1)[0]
    for name in ("broker-ca.pem", "client.pem", "client.key"):  # the TLS files must exist
        (tmp_path / name).write_text("")
        example = example.replace(f"/etc/isthmus/{name}", str(tmp_path / name))
    path = tmp_path / "isthmus.toml"
    path.write_text(example)
    (source,) = load_config(path, {}).sources
    o = parse_options(MqttClientOptions, source.options, "example")
    assert (o.host, o.port, o.tls, o.policy) == ("broker.example.com", 8883, True, "quarantine")
    routes = [Route.build(i, sub) for i, sub in enumerate(o.subscriptions)]
    assert routes[0].identify("pebble/n7/data", b"{}") == {"device": "n7"}
    assert routes[1].identify("sites/north/uplink", b'{"dev_id": "a1"}') == {"site": "north", "dev_id": "a1"}
    assert routes[2].kind == "attributes"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"url": "http://broker"}, "must start with mqtt:// or mqtts://"),
        ({"url": "mqtt://user:pw@broker"}, "credentials"),
        ({"url": "mqtt://broker:99999"}, "url"),
        ({"url": "mqtt://broker/path"}, "path"),
        ({"ca_file": __file__}, "need an mqtts:// url"),
        ({"url": "mqtts://b", "key_file": __file__}, "key_file needs cert_file"),
        ({"url": "mqtts://b", "ca_file": "/nonexistent/ca.pem"}, "ca_file"),
        ({"password": "x"}, "password needs username"),
        ({"reconnect_min": 10, "reconnect_max": 1}, "reconnect_min"),
        ({"protocol": "3.1"}, "protocol"),
        ({"policy": "maybe"}, "policy"),
        ({"subscriptions": []}, "subscriptions"),
        ({"colour": "red"}, "colour: unknown key"),
        ({"subscriptions": [{"filter": "a/#/b", "device": "a/{device}"}]}, "'#' must be a whole level and the last"),
        ({"subscriptions": [{"filter": "a/b+", "device": "a/{device}"}]}, "'+' must be a whole level"),
        ({"subscriptions": [{"filter": "$share//a/+", "device": "a/{device}"}]}, "$share/<group>/<filter>"),
        ({"subscriptions": [{"filter": "$share/g+/a/+", "device": "a/{device}"}]}, "group"),
        ({"subscriptions": [{"filter": "a/+"}]}, "needs a device template containing '{device}', or a device_field"),
        ({"subscriptions": [{"filter": "a/+", "device": "a/{id}"}]}, "'{device}'"),
        ({"subscriptions": [{"filter": "a/+", "device": "a/{device}{x}"}]}, "at most one placeholder"),
        ({"subscriptions": [{"filter": "a/+/+", "device": "a/{device}/{device}"}]}, "appears twice"),
        ({"subscriptions": [{"filter": "a/+", "device": "a/{dev-ice}"}]}, "placeholder"),
        ({"subscriptions": [{"filter": "a/+", "device": "#/{device}"}]}, "'#' must be the last level"),
        ({"subscriptions": [{"filter": "pebble/+/data", "device": "other/{device}/data"}]}, "matches no topic"),
        ({"subscriptions": [{"filter": "pebble/+/data", "device": "pebble/{device}"}]}, "matches no topic"),
        ({"subscriptions": [{"filter": "a/+", "device_field": "dev_id"}]}, "JSON pointer"),
        ({"subscriptions": [{"filter": "a/+", "device_field": "/a~2"}]}, "RFC 6901"),
        ({"subscriptions": [{"filter": "a/+", "device": "a/{id}", "device_field": "/id"}]}, "share a name"),
        ({"subscriptions": [{**SUB, "qos": 3}]}, "qos"),
        ({"subscriptions": [{**SUB, "kind": "events"}]}, "kind"),
    ],
)
def test_invalid_options_are_config_errors(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match="source 'x'") as err:
        options(**change)
    assert message in str(err.value)


def test_the_runtime_refuses_a_bad_source_at_construction(tmp_path: Path) -> None:
    config = load_config(None, {"ISTHMUS_DATA_DIR": str(tmp_path)})
    bad = SourceConfig(
        name="pebble", type="mqtt-client", options={"url": "mqtt://b", "subscriptions": [{"filter": "#"}]}
    )
    with pytest.raises(ConfigError, match=r"source 'pebble': subscriptions\.0: .*device"):
        Runtime(config.model_copy(update={"sources": [bad]}))


def test_templates() -> None:
    t = Template.parse("pebble/{device}/data")
    assert t.match("pebble/node-7/data") == {"device": "node-7"}
    assert t.match("pebble//data") is None and t.match("pebble/a/b/data") is None and t.match("pebble/x") is None
    ttn = Template.parse("v3/{app}@ttn/devices/{device}/up")
    assert ttn.match("v3/farm@ttn/devices/eui-1/up") == {"app": "farm", "device": "eui-1"}
    assert ttn.match("v3/farm@tti/devices/eui-1/up") is None
    wild = Template.parse("+/{device}/#")
    assert wild.match("x/d1") == {"device": "d1"} and wild.match("x/d1/a/b") == {"device": "d1"}
    assert Template.parse("#").match("any/thing") == {}
    assert Template.parse("site-{device}/up").compatible("site-7/up")
    assert not Template.parse("site-{device}/up").compatible("plant-7/up")


def test_shared_subscription_templates_match_the_topic_without_the_prefix() -> None:
    o = options(subscriptions=[{"filter": "$share/isthmus/pebble/+/data", "device": "pebble/{device}/data"}])
    route = Route.build(0, o.subscriptions[0])
    assert route.filter == "$share/isthmus/pebble/+/data" and route.match_filter == "pebble/+/data"
    assert route.identify("pebble/n1/data", b"{}") == {"device": "n1"}


def test_device_field() -> None:
    o = options(subscriptions=[{"filter": "up/#", "device": "up/{site}/#", "device_field": "/meta/dev~1id"}])
    route = Route.build(0, o.subscriptions[0])
    assert route.field_key == "meta/dev~1id"
    assert route.identify("up/s1/x", b'{"meta": {"dev/id": "abc"}}') == {"site": "s1", "meta/dev~1id": "abc"}
    assert route.identify("up/s1/x", b'{"meta": {"dev/id": 7}}') == {"site": "s1", "meta/dev~1id": 7}
    for payload in (b'{"meta": {}}', b'{"meta": {"dev/id": true}}', b'{"meta": {"dev/id": ""}}', b"nope", b"[1]"):
        assert route.identify("up/s1/x", payload) is None, payload
    arr = Route.build(0, options(subscriptions=[{"filter": "a", "device_field": "/ids/1"}]).subscriptions[0])
    assert arr.identify("a", b'{"ids": ["x", "y"]}') == {"ids/1": "y"}
    assert arr.identify("a", b'{"ids": ["x"]}') is None
