from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_ROLE_UNSPECIFIED: _ClassVar[WorkerRole]
    WORKER_ROLE_PREFILL: _ClassVar[WorkerRole]
    WORKER_ROLE_DECODE: _ClassVar[WorkerRole]
    WORKER_ROLE_BOTH: _ClassVar[WorkerRole]
WORKER_ROLE_UNSPECIFIED: WorkerRole
WORKER_ROLE_PREFILL: WorkerRole
WORKER_ROLE_DECODE: WorkerRole
WORKER_ROLE_BOTH: WorkerRole

class SignedEnvelope(_message.Message):
    __slots__ = ("payload", "signer_public_key", "timestamp_ms", "nonce", "signature")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SIGNER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    signer_public_key: bytes
    timestamp_ms: int
    nonce: bytes
    signature: bytes
    def __init__(self, payload: _Optional[bytes] = ..., signer_public_key: _Optional[bytes] = ..., timestamp_ms: _Optional[int] = ..., nonce: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class GpuInfo(_message.Message):
    __slots__ = ("index", "name", "uuid", "memory_total_bytes", "memory_free_bytes", "compute_capability_major", "compute_capability_minor", "nvlink_peers", "pci_bus_id")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_CAPABILITY_MAJOR_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_CAPABILITY_MINOR_FIELD_NUMBER: _ClassVar[int]
    NVLINK_PEERS_FIELD_NUMBER: _ClassVar[int]
    PCI_BUS_ID_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    uuid: str
    memory_total_bytes: int
    memory_free_bytes: int
    compute_capability_major: int
    compute_capability_minor: int
    nvlink_peers: _containers.RepeatedScalarFieldContainer[str]
    pci_bus_id: str
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., uuid: _Optional[str] = ..., memory_total_bytes: _Optional[int] = ..., memory_free_bytes: _Optional[int] = ..., compute_capability_major: _Optional[int] = ..., compute_capability_minor: _Optional[int] = ..., nvlink_peers: _Optional[_Iterable[str]] = ..., pci_bus_id: _Optional[str] = ...) -> None: ...

class RdmaDevice(_message.Message):
    __slots__ = ("name", "port", "state", "link_layer", "rate_gbps", "node_guid")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LINK_LAYER_FIELD_NUMBER: _ClassVar[int]
    RATE_GBPS_FIELD_NUMBER: _ClassVar[int]
    NODE_GUID_FIELD_NUMBER: _ClassVar[int]
    name: str
    port: int
    state: str
    link_layer: str
    rate_gbps: int
    node_guid: str
    def __init__(self, name: _Optional[str] = ..., port: _Optional[int] = ..., state: _Optional[str] = ..., link_layer: _Optional[str] = ..., rate_gbps: _Optional[int] = ..., node_guid: _Optional[str] = ...) -> None: ...

class HostInfo(_message.Message):
    __slots__ = ("hostname", "cpu_count", "memory_total_bytes", "memory_available_bytes", "os", "address")
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    CPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    OS_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    cpu_count: int
    memory_total_bytes: int
    memory_available_bytes: int
    os: str
    address: str
    def __init__(self, hostname: _Optional[str] = ..., cpu_count: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ..., memory_available_bytes: _Optional[int] = ..., os: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "endpoint", "role", "model", "engine", "kv_block_size", "kv_capacity_blocks", "kv_events_endpoint", "kv_transfer_endpoint", "gpu_indices", "kv_events_replay_endpoint", "api_token")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_CAPACITY_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    KV_EVENTS_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    GPU_INDICES_FIELD_NUMBER: _ClassVar[int]
    KV_EVENTS_REPLAY_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    API_TOKEN_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    endpoint: str
    role: WorkerRole
    model: str
    engine: str
    kv_block_size: int
    kv_capacity_blocks: int
    kv_events_endpoint: str
    kv_transfer_endpoint: str
    gpu_indices: _containers.RepeatedScalarFieldContainer[int]
    kv_events_replay_endpoint: str
    api_token: str
    def __init__(self, worker_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., role: _Optional[_Union[WorkerRole, str]] = ..., model: _Optional[str] = ..., engine: _Optional[str] = ..., kv_block_size: _Optional[int] = ..., kv_capacity_blocks: _Optional[int] = ..., kv_events_endpoint: _Optional[str] = ..., kv_transfer_endpoint: _Optional[str] = ..., gpu_indices: _Optional[_Iterable[int]] = ..., kv_events_replay_endpoint: _Optional[str] = ..., api_token: _Optional[str] = ...) -> None: ...

class ExpertPlacement(_message.Message):
    __slots__ = ("model", "worker_id", "layer", "experts")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    worker_id: str
    layer: int
    experts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model: _Optional[str] = ..., worker_id: _Optional[str] = ..., layer: _Optional[int] = ..., experts: _Optional[_Iterable[int]] = ...) -> None: ...

class CapabilityReport(_message.Message):
    __slots__ = ("host", "gpus", "rdma", "ray_node_id", "workers", "experts", "attributes", "agent_version", "probe_note")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    HOST_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    RDMA_FIELD_NUMBER: _ClassVar[int]
    RAY_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROBE_NOTE_FIELD_NUMBER: _ClassVar[int]
    host: HostInfo
    gpus: _containers.RepeatedCompositeFieldContainer[GpuInfo]
    rdma: _containers.RepeatedCompositeFieldContainer[RdmaDevice]
    ray_node_id: str
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    experts: _containers.RepeatedCompositeFieldContainer[ExpertPlacement]
    attributes: _containers.ScalarMap[str, str]
    agent_version: str
    probe_note: str
    def __init__(self, host: _Optional[_Union[HostInfo, _Mapping]] = ..., gpus: _Optional[_Iterable[_Union[GpuInfo, _Mapping]]] = ..., rdma: _Optional[_Iterable[_Union[RdmaDevice, _Mapping]]] = ..., ray_node_id: _Optional[str] = ..., workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ..., experts: _Optional[_Iterable[_Union[ExpertPlacement, _Mapping]]] = ..., attributes: _Optional[_Mapping[str, str]] = ..., agent_version: _Optional[str] = ..., probe_note: _Optional[str] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("capabilities", "join_token")
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    JOIN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    capabilities: CapabilityReport
    join_token: str
    def __init__(self, capabilities: _Optional[_Union[CapabilityReport, _Mapping]] = ..., join_token: _Optional[str] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("node_id", "heartbeat_interval_s", "enrolled")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    ENROLLED_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    heartbeat_interval_s: float
    enrolled: bool
    def __init__(self, node_id: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., enrolled: _Optional[bool] = ...) -> None: ...

class WorkerLoad(_message.Message):
    __slots__ = ("worker_id", "num_running", "num_waiting", "kv_usage", "healthy")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_USAGE_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    num_running: int
    num_waiting: int
    kv_usage: float
    healthy: bool
    def __init__(self, worker_id: _Optional[str] = ..., num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ..., kv_usage: _Optional[float] = ..., healthy: _Optional[bool] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("seq", "cpu_load", "memory_available_bytes", "workers", "capabilities_changed", "role_generation")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CPU_LOAD_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_CHANGED_FIELD_NUMBER: _ClassVar[int]
    ROLE_GENERATION_FIELD_NUMBER: _ClassVar[int]
    seq: int
    cpu_load: float
    memory_available_bytes: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerLoad]
    capabilities_changed: bool
    role_generation: int
    def __init__(self, seq: _Optional[int] = ..., cpu_load: _Optional[float] = ..., memory_available_bytes: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerLoad, _Mapping]]] = ..., capabilities_changed: _Optional[bool] = ..., role_generation: _Optional[int] = ...) -> None: ...

class RoleChange(_message.Message):
    __slots__ = ("worker_id", "role", "generation")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: WorkerRole
    generation: int
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[_Union[WorkerRole, str]] = ..., generation: _Optional[int] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("heartbeat_interval_s", "state", "role_changes")
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ROLE_CHANGES_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_s: float
    state: str
    role_changes: _containers.RepeatedCompositeFieldContainer[RoleChange]
    def __init__(self, heartbeat_interval_s: _Optional[float] = ..., state: _Optional[str] = ..., role_changes: _Optional[_Iterable[_Union[RoleChange, _Mapping]]] = ...) -> None: ...

class SetRoleRequest(_message.Message):
    __slots__ = ("node_id", "worker_id", "role")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    worker_id: str
    role: WorkerRole
    def __init__(self, node_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., role: _Optional[_Union[WorkerRole, str]] = ...) -> None: ...

class SetRoleReply(_message.Message):
    __slots__ = ("generation",)
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    generation: int
    def __init__(self, generation: _Optional[int] = ...) -> None: ...

class DeregisterRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class DeregisterReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node_id", "host", "gpu_count", "gpu_names", "state", "last_heartbeat_unix", "heartbeat_age_s", "workers", "attributes", "ray_node_id", "pending_roles")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    GPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    GPU_NAMES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_UNIX_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    RAY_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PENDING_ROLES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    host: str
    gpu_count: int
    gpu_names: _containers.RepeatedScalarFieldContainer[str]
    state: str
    last_heartbeat_unix: float
    heartbeat_age_s: float
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    attributes: _containers.ScalarMap[str, str]
    ray_node_id: str
    pending_roles: _containers.RepeatedCompositeFieldContainer[RoleChange]
    def __init__(self, node_id: _Optional[str] = ..., host: _Optional[str] = ..., gpu_count: _Optional[int] = ..., gpu_names: _Optional[_Iterable[str]] = ..., state: _Optional[str] = ..., last_heartbeat_unix: _Optional[float] = ..., heartbeat_age_s: _Optional[float] = ..., workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ..., attributes: _Optional[_Mapping[str, str]] = ..., ray_node_id: _Optional[str] = ..., pending_roles: _Optional[_Iterable[_Union[RoleChange, _Mapping]]] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("nodes", "coordinator_started_unix")
    NODES_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_STARTED_UNIX_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    coordinator_started_unix: float
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ..., coordinator_started_unix: _Optional[float] = ...) -> None: ...
