import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListServicesRequest(_message.Message):
    __slots__ = ("namespace",)
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    def __init__(self, namespace: _Optional[str] = ...) -> None: ...

class ListServicesResponse(_message.Message):
    __slots__ = ("services",)
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    services: _containers.RepeatedCompositeFieldContainer[ServiceSummary]
    def __init__(self, services: _Optional[_Iterable[_Union[ServiceSummary, _Mapping]]] = ...) -> None: ...

class ServiceSummary(_message.Message):
    __slots__ = ("namespace", "name", "protocol", "instances", "serving", "has_policy", "mtls_mode", "authz")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    HAS_POLICY_FIELD_NUMBER: _ClassVar[int]
    MTLS_MODE_FIELD_NUMBER: _ClassVar[int]
    AUTHZ_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    name: str
    protocol: str
    instances: int
    serving: int
    has_policy: bool
    mtls_mode: str
    authz: str
    def __init__(self, namespace: _Optional[str] = ..., name: _Optional[str] = ..., protocol: _Optional[str] = ..., instances: _Optional[int] = ..., serving: _Optional[int] = ..., has_policy: _Optional[bool] = ..., mtls_mode: _Optional[str] = ..., authz: _Optional[str] = ...) -> None: ...

class GetServiceRequest(_message.Message):
    __slots__ = ("namespace", "service")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    service: str
    def __init__(self, namespace: _Optional[str] = ..., service: _Optional[str] = ...) -> None: ...

class Service(_message.Message):
    __slots__ = ("namespace", "name", "protocol", "endpoints")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    name: str
    protocol: str
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    def __init__(self, namespace: _Optional[str] = ..., name: _Optional[str] = ..., protocol: _Optional[str] = ..., endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ...) -> None: ...

class Endpoint(_message.Message):
    __slots__ = ("address", "labels", "registered_weight", "override", "effective_weight", "enabled", "registered", "load", "version")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    OVERRIDE_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    address: str
    labels: _containers.ScalarMap[str, str]
    registered_weight: int
    override: Override
    effective_weight: int
    enabled: bool
    registered: bool
    load: EndpointLoad
    version: int
    def __init__(self, address: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., registered_weight: _Optional[int] = ..., override: _Optional[_Union[Override, _Mapping]] = ..., effective_weight: _Optional[int] = ..., enabled: _Optional[bool] = ..., registered: _Optional[bool] = ..., load: _Optional[_Union[EndpointLoad, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class Override(_message.Message):
    __slots__ = ("weight", "enabled")
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    weight: int
    enabled: bool
    def __init__(self, weight: _Optional[int] = ..., enabled: _Optional[bool] = ...) -> None: ...

class EndpointLoad(_message.Message):
    __slots__ = ("rps", "error_ratio", "mean_latency_seconds", "in_progress")
    RPS_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATIO_FIELD_NUMBER: _ClassVar[int]
    MEAN_LATENCY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IN_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    rps: float
    error_ratio: float
    mean_latency_seconds: float
    in_progress: int
    def __init__(self, rps: _Optional[float] = ..., error_ratio: _Optional[float] = ..., mean_latency_seconds: _Optional[float] = ..., in_progress: _Optional[int] = ...) -> None: ...

class SetWeightRequest(_message.Message):
    __slots__ = ("namespace", "service", "address", "weight", "expected_version")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    service: str
    address: str
    weight: int
    expected_version: int
    def __init__(self, namespace: _Optional[str] = ..., service: _Optional[str] = ..., address: _Optional[str] = ..., weight: _Optional[int] = ..., expected_version: _Optional[int] = ...) -> None: ...

class SetEnabledRequest(_message.Message):
    __slots__ = ("namespace", "service", "address", "enabled", "expected_version")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    service: str
    address: str
    enabled: bool
    expected_version: int
    def __init__(self, namespace: _Optional[str] = ..., service: _Optional[str] = ..., address: _Optional[str] = ..., enabled: _Optional[bool] = ..., expected_version: _Optional[int] = ...) -> None: ...

class ClearOverrideRequest(_message.Message):
    __slots__ = ("namespace", "service", "address", "expected_version")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    service: str
    address: str
    expected_version: int
    def __init__(self, namespace: _Optional[str] = ..., service: _Optional[str] = ..., address: _Optional[str] = ..., expected_version: _Optional[int] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ("namespace", "service")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    service: str
    def __init__(self, namespace: _Optional[str] = ..., service: _Optional[str] = ...) -> None: ...

class Policy(_message.Message):
    __slots__ = ("namespace", "service", "json", "version")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    service: str
    json: str
    version: int
    def __init__(self, namespace: _Optional[str] = ..., service: _Optional[str] = ..., json: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class SetPolicyRequest(_message.Message):
    __slots__ = ("namespace", "service", "json", "expected_version")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    service: str
    json: str
    expected_version: int
    def __init__(self, namespace: _Optional[str] = ..., service: _Optional[str] = ..., json: _Optional[str] = ..., expected_version: _Optional[int] = ...) -> None: ...

class SetTrafficSplitRequest(_message.Message):
    __slots__ = ("namespace", "service", "split", "expected_version")
    class SplitEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    service: str
    split: _containers.ScalarMap[str, int]
    expected_version: int
    def __init__(self, namespace: _Optional[str] = ..., service: _Optional[str] = ..., split: _Optional[_Mapping[str, int]] = ..., expected_version: _Optional[int] = ...) -> None: ...

class GetConfigRequest(_message.Message):
    __slots__ = ("namespace", "service")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    service: str
    def __init__(self, namespace: _Optional[str] = ..., service: _Optional[str] = ...) -> None: ...

class RuntimeConfig(_message.Message):
    __slots__ = ("namespace", "service", "values", "version")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    service: str
    values: _containers.ScalarMap[str, str]
    version: int
    def __init__(self, namespace: _Optional[str] = ..., service: _Optional[str] = ..., values: _Optional[_Mapping[str, str]] = ..., version: _Optional[int] = ...) -> None: ...

class SetConfigRequest(_message.Message):
    __slots__ = ("namespace", "service", "values", "expected_version")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    service: str
    values: _containers.ScalarMap[str, str]
    expected_version: int
    def __init__(self, namespace: _Optional[str] = ..., service: _Optional[str] = ..., values: _Optional[_Mapping[str, str]] = ..., expected_version: _Optional[int] = ...) -> None: ...

class DeleteConfigKeyRequest(_message.Message):
    __slots__ = ("namespace", "service", "key", "expected_version")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    service: str
    key: str
    expected_version: int
    def __init__(self, namespace: _Optional[str] = ..., service: _Optional[str] = ..., key: _Optional[str] = ..., expected_version: _Optional[int] = ...) -> None: ...

class ListProxiesRequest(_message.Message):
    __slots__ = ("namespace",)
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    def __init__(self, namespace: _Optional[str] = ...) -> None: ...

class ListProxiesResponse(_message.Message):
    __slots__ = ("proxies",)
    PROXIES_FIELD_NUMBER: _ClassVar[int]
    proxies: _containers.RepeatedCompositeFieldContainer[Proxy]
    def __init__(self, proxies: _Optional[_Iterable[_Union[Proxy, _Mapping]]] = ...) -> None: ...

class Proxy(_message.Message):
    __slots__ = ("node_id", "service", "namespace", "instance", "connected_since", "types")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_SINCE_FIELD_NUMBER: _ClassVar[int]
    TYPES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    service: str
    namespace: str
    instance: str
    connected_since: _timestamp_pb2.Timestamp
    types: _containers.RepeatedCompositeFieldContainer[TypeStatus]
    def __init__(self, node_id: _Optional[str] = ..., service: _Optional[str] = ..., namespace: _Optional[str] = ..., instance: _Optional[str] = ..., connected_since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., types: _Optional[_Iterable[_Union[TypeStatus, _Mapping]]] = ...) -> None: ...

class TypeStatus(_message.Message):
    __slots__ = ("type", "version_sent", "version_acked", "acked_at", "last_nack_error", "last_nack_version")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VERSION_SENT_FIELD_NUMBER: _ClassVar[int]
    VERSION_ACKED_FIELD_NUMBER: _ClassVar[int]
    ACKED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_NACK_ERROR_FIELD_NUMBER: _ClassVar[int]
    LAST_NACK_VERSION_FIELD_NUMBER: _ClassVar[int]
    type: str
    version_sent: str
    version_acked: str
    acked_at: _timestamp_pb2.Timestamp
    last_nack_error: str
    last_nack_version: str
    def __init__(self, type: _Optional[str] = ..., version_sent: _Optional[str] = ..., version_acked: _Optional[str] = ..., acked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_nack_error: _Optional[str] = ..., last_nack_version: _Optional[str] = ...) -> None: ...

class GetProxyConfigRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class ProxyConfig(_message.Message):
    __slots__ = ("node_id", "types")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TYPES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    types: _containers.RepeatedCompositeFieldContainer[AckedResources]
    def __init__(self, node_id: _Optional[str] = ..., types: _Optional[_Iterable[_Union[AckedResources, _Mapping]]] = ...) -> None: ...

class AckedResources(_message.Message):
    __slots__ = ("type", "version", "resources_json")
    class ResourcesJsonEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_JSON_FIELD_NUMBER: _ClassVar[int]
    type: str
    version: str
    resources_json: _containers.ScalarMap[str, str]
    def __init__(self, type: _Optional[str] = ..., version: _Optional[str] = ..., resources_json: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ListAlertsRequest(_message.Message):
    __slots__ = ("namespace", "name")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    name: str
    def __init__(self, namespace: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class ListAlertsResponse(_message.Message):
    __slots__ = ("alerts",)
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    alerts: _containers.RepeatedCompositeFieldContainer[Alert]
    def __init__(self, alerts: _Optional[_Iterable[_Union[Alert, _Mapping]]] = ...) -> None: ...

class Alert(_message.Message):
    __slots__ = ("namespace", "name", "json", "version", "service", "condition", "severity", "for_duration", "state", "value", "active_since", "fired_at", "resolved_at", "error")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    FOR_DURATION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SINCE_FIELD_NUMBER: _ClassVar[int]
    FIRED_AT_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_AT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    name: str
    json: str
    version: int
    service: str
    condition: str
    severity: str
    for_duration: str
    state: str
    value: float
    active_since: _timestamp_pb2.Timestamp
    fired_at: _timestamp_pb2.Timestamp
    resolved_at: _timestamp_pb2.Timestamp
    error: str
    def __init__(self, namespace: _Optional[str] = ..., name: _Optional[str] = ..., json: _Optional[str] = ..., version: _Optional[int] = ..., service: _Optional[str] = ..., condition: _Optional[str] = ..., severity: _Optional[str] = ..., for_duration: _Optional[str] = ..., state: _Optional[str] = ..., value: _Optional[float] = ..., active_since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., fired_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., resolved_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...

class SetAlertRequest(_message.Message):
    __slots__ = ("namespace", "name", "json", "expected_version")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    name: str
    json: str
    expected_version: int
    def __init__(self, namespace: _Optional[str] = ..., name: _Optional[str] = ..., json: _Optional[str] = ..., expected_version: _Optional[int] = ...) -> None: ...

class DeleteAlertRequest(_message.Message):
    __slots__ = ("namespace", "name", "expected_version")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    name: str
    expected_version: int
    def __init__(self, namespace: _Optional[str] = ..., name: _Optional[str] = ..., expected_version: _Optional[int] = ...) -> None: ...

class IssueIdentityTokenRequest(_message.Message):
    __slots__ = ("namespace", "service")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    service: str
    def __init__(self, namespace: _Optional[str] = ..., service: _Optional[str] = ...) -> None: ...

class IdentityToken(_message.Message):
    __slots__ = ("token", "spiffe_id")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    token: str
    spiffe_id: str
    def __init__(self, token: _Optional[str] = ..., spiffe_id: _Optional[str] = ...) -> None: ...

class GetAuthzRequest(_message.Message):
    __slots__ = ("namespace", "service")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    service: str
    def __init__(self, namespace: _Optional[str] = ..., service: _Optional[str] = ...) -> None: ...

class Authz(_message.Message):
    __slots__ = ("namespace", "service", "json", "version", "error")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    service: str
    json: str
    version: int
    error: str
    def __init__(self, namespace: _Optional[str] = ..., service: _Optional[str] = ..., json: _Optional[str] = ..., version: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class SetAuthzRequest(_message.Message):
    __slots__ = ("namespace", "service", "json", "expected_version")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    service: str
    json: str
    expected_version: int
    def __init__(self, namespace: _Optional[str] = ..., service: _Optional[str] = ..., json: _Optional[str] = ..., expected_version: _Optional[int] = ...) -> None: ...

class DeleteAuthzRequest(_message.Message):
    __slots__ = ("namespace", "service", "expected_version")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    service: str
    expected_version: int
    def __init__(self, namespace: _Optional[str] = ..., service: _Optional[str] = ..., expected_version: _Optional[int] = ...) -> None: ...

class GetPeerAuthenticationRequest(_message.Message):
    __slots__ = ("namespace", "service")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    service: str
    def __init__(self, namespace: _Optional[str] = ..., service: _Optional[str] = ...) -> None: ...

class PeerAuthentication(_message.Message):
    __slots__ = ("namespace", "service", "mode", "version", "effective_mode", "effective_from", "error")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_MODE_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_FROM_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    service: str
    mode: str
    version: int
    effective_mode: str
    effective_from: str
    error: str
    def __init__(self, namespace: _Optional[str] = ..., service: _Optional[str] = ..., mode: _Optional[str] = ..., version: _Optional[int] = ..., effective_mode: _Optional[str] = ..., effective_from: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class SetPeerAuthenticationRequest(_message.Message):
    __slots__ = ("namespace", "service", "mode", "expected_version")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    service: str
    mode: str
    expected_version: int
    def __init__(self, namespace: _Optional[str] = ..., service: _Optional[str] = ..., mode: _Optional[str] = ..., expected_version: _Optional[int] = ...) -> None: ...

class DeletePeerAuthenticationRequest(_message.Message):
    __slots__ = ("namespace", "service", "expected_version")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    service: str
    expected_version: int
    def __init__(self, namespace: _Optional[str] = ..., service: _Optional[str] = ..., expected_version: _Optional[int] = ...) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ("namespace", "kinds")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    kinds: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, namespace: _Optional[str] = ..., kinds: _Optional[_Iterable[str]] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("at", "kind", "namespace", "service", "node_id", "who", "summary", "before", "after", "alert", "state")
    AT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    WHO_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    ALERT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    at: _timestamp_pb2.Timestamp
    kind: str
    namespace: str
    service: str
    node_id: str
    who: str
    summary: str
    before: str
    after: str
    alert: str
    state: str
    def __init__(self, at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., kind: _Optional[str] = ..., namespace: _Optional[str] = ..., service: _Optional[str] = ..., node_id: _Optional[str] = ..., who: _Optional[str] = ..., summary: _Optional[str] = ..., before: _Optional[str] = ..., after: _Optional[str] = ..., alert: _Optional[str] = ..., state: _Optional[str] = ...) -> None: ...
