"""Tensors and scalar maps to and from the wire, with validation on the way in.

Tensors travel as raw little-endian bytes plus dtype and shape, split into chunks
of at most ``CHUNK_BYTES``. Decoding never unpickles anything and checks every
chunk against what the receiver expects before it allocates.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from fedtrain.errors import WireError
from fedtrain.protocol import fedtrain_pb2 as pb

PROTOCOL_VERSION = "fedtrain.v1"
CHUNK_BYTES = 1 << 20
# gRPC's cap per message; chunks stay well below it.
MAX_MESSAGE_BYTES = 4 << 20
ALLOWED_DTYPES = frozenset(
    {"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint32", "bool"}
)

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


Manifest = Mapping[str, TensorInfo]


def manifest_of(arrays: Mapping[str, np.ndarray]) -> dict[str, TensorInfo]:
    return {k: TensorInfo(v.dtype.name, tuple(int(s) for s in v.shape)) for k, v in arrays.items()}


def encode_arrays(arrays: Mapping[str, np.ndarray], chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.TensorChunk]:
    for name, arr in arrays.items():
        arr = np.asarray(arr)
        dtype = arr.dtype.name  # byte-order free: ">f4" and "<f4" are both "float32"
        if dtype not in ALLOWED_DTYPES:
            raise WireError(f"tensor {name!r} has dtype {dtype}, which the protocol does not carry")
        data = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
        shape = list(arr.shape)
        for offset in range(0, max(len(data), 1), chunk_bytes):
            yield pb.TensorChunk(
                name=name, dtype=dtype, shape=shape, offset=offset,
                total_bytes=len(data), data=data[offset : offset + chunk_bytes],
            )


def decode_arrays(chunks: Iterable[pb.TensorChunk], expected: Manifest | None = None,
                  max_total_bytes: int = 1 << 30) -> dict[str, np.ndarray]:
    """Reassemble tensors. With ``expected``, names, dtypes and shapes must match it exactly."""
    buffers: dict[str, bytearray] = {}
    infos: dict[str, TensorInfo] = {}
    total = 0
    for c in chunks:
        info = TensorInfo(c.dtype, tuple(c.shape))
        if c.dtype not in ALLOWED_DTYPES:
            raise WireError(f"tensor {c.name!r}: dtype {c.dtype!r} is not allowed (allowed: {sorted(ALLOWED_DTYPES)})")
        if any(s < 0 for s in info.shape):
            raise WireError(f"tensor {c.name!r}: negative dimension in shape {info.shape}")
        if expected is not None:
            if c.name not in expected:
                raise WireError(f"unexpected tensor {c.name!r}; expected only {sorted(expected)}")
            if expected[c.name] != info:
                want = expected[c.name]
                raise WireError(
                    f"tensor {c.name!r} is {info.dtype}{list(info.shape)}, expected {want.dtype}{list(want.shape)}"
                )
        if c.total_bytes != info.nbytes:
            raise WireError(f"tensor {c.name!r}: total_bytes {c.total_bytes} does not match {info.dtype}{list(info.shape)}")
        buf = buffers.get(c.name)
        if buf is None:
            total += info.nbytes
            if total > max_total_bytes:
                raise WireError(f"tensors exceed the limit of {max_total_bytes} bytes")
            buf = buffers[c.name] = bytearray()
            infos[c.name] = info
        elif infos[c.name] != info:
            raise WireError(f"tensor {c.name!r}: chunks disagree on dtype or shape")
        if c.offset != len(buf) or len(buf) + len(c.data) > info.nbytes:
            raise WireError(f"tensor {c.name!r}: chunk at offset {c.offset} is out of order or too long")
        buf += c.data
    if expected is not None and set(buffers) != set(expected):
        raise WireError(f"missing tensor(s) {sorted(set(expected) - set(buffers))}")
    out = {}
    for name, buf in buffers.items():
        info = infos[name]
        if len(buf) != info.nbytes:
            raise WireError(f"tensor {name!r}: got {len(buf)} of {info.nbytes} bytes")
        arr = np.frombuffer(bytes(buf), dtype=np.dtype(info.dtype).newbyteorder("<")).reshape(info.shape)
        out[name] = arr.astype(info.dtype)
    return out


def require_finite(arrays: Mapping[str, np.ndarray]) -> None:
    bad = [k for k, v in arrays.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
    if bad:
        raise WireError(f"tensor(s) {bad} contain NaN or infinite values")


def payload_digest(chunks: Iterable[pb.TensorChunk]) -> str:
    """sha256 over the serialized chunks: what the audit log records for a payload."""
    h = hashlib.sha256()
    for c in chunks:
        h.update(c.SerializeToString(deterministic=True))
    return h.hexdigest()


def model_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 of a set of tensors, whatever the chunking they travelled in."""
    return payload_digest(encode_arrays(dict(sorted(arrays.items()))))


def encode_values(values: Mapping[str, bool | int | float | str]) -> dict[str, pb.Value]:
    out = {}
    for k, v in values.items():
        if isinstance(v, bool):
            out[k] = pb.Value(b=v)
        elif isinstance(v, int):
            out[k] = pb.Value(i=v)
        elif isinstance(v, float):
            out[k] = pb.Value(f=v)
        elif isinstance(v, str):
            out[k] = pb.Value(s=v)
        else:
            raise WireError(f"value {k!r} has type {type(v).__name__}; only bool, int, float and str travel")
    return out


def decode_values(values: Mapping[str, pb.Value]) -> dict[str, bool | int | float | str]:
    out: dict[str, bool | int | float | str] = {}
    for k, v in values.items():
        kind = v.WhichOneof("kind")
        if kind is None:
            raise WireError(f"value {k!r} is empty")
        out[k] = getattr(v, kind)
    return out
