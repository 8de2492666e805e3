from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorChunk(_message.Message):
    __slots__ = ("name", "dtype", "shape", "offset", "total_bytes", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    total_bytes: int
    data: bytes
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., total_bytes: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class Value(_message.Message):
    __slots__ = ("f", "i", "s", "b")
    F_FIELD_NUMBER: _ClassVar[int]
    I_FIELD_NUMBER: _ClassVar[int]
    S_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    f: float
    i: int
    s: str
    b: bool
    def __init__(self, f: _Optional[float] = ..., i: _Optional[int] = ..., s: _Optional[str] = ..., b: _Optional[bool] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("name", "protocol_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    protocol_version: str
    def __init__(self, name: _Optional[str] = ..., protocol_version: _Optional[str] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    def __init__(self, node_id: _Optional[int] = ...) -> None: ...

class PollRequest(_message.Message):
    __slots__ = ("node_id", "wait_seconds")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    wait_seconds: float
    def __init__(self, node_id: _Optional[int] = ..., wait_seconds: _Optional[float] = ...) -> None: ...

class JobOffer(_message.Message):
    __slots__ = ("job_id", "spec_json")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    spec_json: str
    def __init__(self, job_id: _Optional[str] = ..., spec_json: _Optional[str] = ...) -> None: ...

class TaskHeader(_message.Message):
    __slots__ = ("task_id", "job_id", "round", "message_type", "config")
    class ConfigEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_TYPE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    job_id: str
    round: int
    message_type: str
    config: _containers.MessageMap[str, Value]
    def __init__(self, task_id: _Optional[str] = ..., job_id: _Optional[str] = ..., round: _Optional[int] = ..., message_type: _Optional[str] = ..., config: _Optional[_Mapping[str, Value]] = ...) -> None: ...

class PollReply(_message.Message):
    __slots__ = ("offer", "task")
    OFFER_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    offer: JobOffer
    task: TaskHeader
    def __init__(self, offer: _Optional[_Union[JobOffer, _Mapping]] = ..., task: _Optional[_Union[TaskHeader, _Mapping]] = ...) -> None: ...

class OfferAnswer(_message.Message):
    __slots__ = ("node_id", "job_id", "decision", "reason")
    class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DECISION_UNSPECIFIED: _ClassVar[OfferAnswer.Decision]
        ACCEPTED: _ClassVar[OfferAnswer.Decision]
        REFUSED: _ClassVar[OfferAnswer.Decision]
        PENDING_APPROVAL: _ClassVar[OfferAnswer.Decision]
    DECISION_UNSPECIFIED: OfferAnswer.Decision
    ACCEPTED: OfferAnswer.Decision
    REFUSED: OfferAnswer.Decision
    PENDING_APPROVAL: OfferAnswer.Decision
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    job_id: str
    decision: OfferAnswer.Decision
    reason: str
    def __init__(self, node_id: _Optional[int] = ..., job_id: _Optional[str] = ..., decision: _Optional[_Union[OfferAnswer.Decision, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("node_id", "task_id")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    task_id: str
    def __init__(self, node_id: _Optional[int] = ..., task_id: _Optional[str] = ...) -> None: ...

class ResultHeader(_message.Message):
    __slots__ = ("node_id", "task_id", "metrics", "refusal")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    task_id: str
    metrics: _containers.MessageMap[str, Value]
    refusal: str
    def __init__(self, node_id: _Optional[int] = ..., task_id: _Optional[str] = ..., metrics: _Optional[_Mapping[str, Value]] = ..., refusal: _Optional[str] = ...) -> None: ...

class ResultPart(_message.Message):
    __slots__ = ("header", "tensor")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    header: ResultHeader
    tensor: TensorChunk
    def __init__(self, header: _Optional[_Union[ResultHeader, _Mapping]] = ..., tensor: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("spec_json",)
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    spec_json: str
    def __init__(self, spec_json: _Optional[str] = ...) -> None: ...

class SubmitJobReply(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id", "round")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    round: int
    def __init__(self, job_id: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class NodeJobState(_message.Message):
    __slots__ = ("node_id", "name", "decision", "reason")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    name: str
    decision: str
    reason: str
    def __init__(self, node_id: _Optional[int] = ..., name: _Optional[str] = ..., decision: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class NodeRoundResult(_message.Message):
    __slots__ = ("node_id", "name", "metrics", "refusal", "bytes_received")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    name: str
    metrics: _containers.MessageMap[str, Value]
    refusal: str
    bytes_received: int
    def __init__(self, node_id: _Optional[int] = ..., name: _Optional[str] = ..., metrics: _Optional[_Mapping[str, Value]] = ..., refusal: _Optional[str] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class RoundStatus(_message.Message):
    __slots__ = ("round", "metrics", "wall_seconds", "nodes")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    round: int
    metrics: _containers.ScalarMap[str, float]
    wall_seconds: float
    nodes: _containers.RepeatedCompositeFieldContainer[NodeRoundResult]
    def __init__(self, round: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., wall_seconds: _Optional[float] = ..., nodes: _Optional[_Iterable[_Union[NodeRoundResult, _Mapping]]] = ...) -> None: ...

class JobStatus(_message.Message):
    __slots__ = ("job_id", "name", "state", "error", "rounds_total", "nodes", "rounds", "spec_json")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    name: str
    state: str
    error: str
    rounds_total: int
    nodes: _containers.RepeatedCompositeFieldContainer[NodeJobState]
    rounds: _containers.RepeatedCompositeFieldContainer[RoundStatus]
    spec_json: str
    def __init__(self, job_id: _Optional[str] = ..., name: _Optional[str] = ..., state: _Optional[str] = ..., error: _Optional[str] = ..., rounds_total: _Optional[int] = ..., nodes: _Optional[_Iterable[_Union[NodeJobState, _Mapping]]] = ..., rounds: _Optional[_Iterable[_Union[RoundStatus, _Mapping]]] = ..., spec_json: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListJobsReply(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobStatus]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobStatus, _Mapping]]] = ...) -> None: ...

class ResultBundle(_message.Message):
    __slots__ = ("header", "tensors")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    header: ResultHeader
    tensors: _containers.RepeatedCompositeFieldContainer[TensorChunk]
    def __init__(self, header: _Optional[_Union[ResultHeader, _Mapping]] = ..., tensors: _Optional[_Iterable[_Union[TensorChunk, _Mapping]]] = ...) -> None: ...

class TensorSet(_message.Message):
    __slots__ = ("tensors",)
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorChunk]
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorChunk, _Mapping]]] = ...) -> None: ...
