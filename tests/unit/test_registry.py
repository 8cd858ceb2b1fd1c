"""Registry records: what validates, what is refused with a message naming the field."""

import pytest

from meshkeeper.registry import (
    InstanceRecord,
    Override,
    Paths,
    RecordError,
    ServiceRecord,
    effective_weight,
    is_serving,
    parse_endpoint_key,
)


def test_instance_round_trip_and_defaults():
    rec = InstanceRecord.decode(b'{"address": "127.0.0.1", "port": 15006, "labels": {"version": "v1", "zone": "a"},'
                                b' "app_port": 8080}')
    assert (rec.key, rec.weight, rec.protocol, rec.version, rec.zone) == ("127.0.0.1:15006", 10, "http", "v1", "a")
    assert InstanceRecord.decode(rec.encode()) == rec


@pytest.mark.parametrize("payload, field", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "expected a JSON object"),
    (b'{"address": "h", "port": 0}', "instance.port"),
    (b'{"address": "h", "port": 80, "weight": -1}', "instance.weight"),
    (b'{"address": "h", "port": 80, "weight": true}', "instance.weight"),
    (b'{"address": "", "port": 80}', "instance.address"),
    (b'{"address": "h", "port": 80, "protocol": "smtp"}', "instance.protocol"),
    (b'{"address": "h", "port": 80, "colour": "red"}', "unknown field 'colour'"),
    (b'{"address": "h", "port": 80, "labels": {"v": 1}}', "instance.labels"),
])
def test_bad_instances_are_refused_naming_the_field(payload, field):
    with pytest.raises(RecordError, match=field):
        InstanceRecord.decode(payload)


def test_service_and_override_records():
    assert ServiceRecord.decode(b"").protocol == "http"
    assert ServiceRecord.decode(b'{"protocol": "grpc"}').protocol == "grpc"
    with pytest.raises(RecordError, match="service.protocol"):
        ServiceRecord.decode(b'{"protocol": "udp"}')
    ov = Override.decode(b'{"weight": 3}')
    assert (ov.weight, ov.enabled) == (3, None) and Override.decode(ov.encode()) == ov
    with pytest.raises(RecordError, match="override.enabled"):
        Override.decode(b'{"enabled": "no"}')


def test_effective_weight_and_serving():
    inst = InstanceRecord(address="h", port=1, weight=7)
    assert effective_weight(inst, None) == 7 and is_serving(inst, None)
    assert effective_weight(inst, Override(weight=2)) == 2
    assert not is_serving(inst, Override(weight=0))
    assert not is_serving(inst, Override(enabled=False))
    assert is_serving(inst, Override(enabled=True)) and effective_weight(inst, Override(enabled=True)) == 7
    assert not is_serving(InstanceRecord(address="h", port=1, weight=0), None)


def test_paths_and_names():
    p = Paths("prod")
    assert p.instance("catalog", "10.0.0.1:15006") == "/meshkeeper/prod/services/catalog/instances/10.0.0.1:15006"
    assert p.override("catalog", "k") == "/meshkeeper/prod/services/catalog/overrides/k"
    assert p.policy("catalog") == "/meshkeeper/prod/services/catalog/policy"
    assert p.config("catalog") == "/meshkeeper/prod/config/catalog"
    assert parse_endpoint_key("10.0.0.1:80") == ("10.0.0.1", 80)
    for bad in ("nohost", ":80", "h:0", "h:x"):
        with pytest.raises(RecordError):
            parse_endpoint_key(bad)
    with pytest.raises(RecordError, match="namespace"):
        Paths("Prod_1")
