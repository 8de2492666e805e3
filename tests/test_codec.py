import numpy as np
import pytest

from fedtrain.errors import WireError
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.protocol.codec import (
    decode_arrays, decode_values, encode_arrays, encode_values, manifest_of, payload_digest, require_finite,
)


def test_round_trip_chunks_large_tensors_below_the_cap():
    arrays = {"w": np.random.default_rng(0).normal(size=(300, 1000)).astype(np.float32),
              "b": np.arange(7, dtype=np.int64), "s": np.float64(3.5) * np.ones(())}
    chunks = list(encode_arrays(arrays, chunk_bytes=1 << 16))
    assert max(c.ByteSize() for c in chunks) < (1 << 16) + 200
    assert len([c for c in chunks if c.name == "w"]) == 19  # 1.2 MB in 64 KiB chunks
    out = decode_arrays(chunks, expected=manifest_of(arrays))
    for k, v in arrays.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape
        np.testing.assert_array_equal(out[k], v)


def test_bytes_are_little_endian_raw_values():
    (chunk,) = encode_arrays({"x": np.array([1.0], dtype=">f4")})
    assert chunk.data == np.array([1.0], dtype="<f4").tobytes()


def test_wrong_shape_is_named():
    chunks = list(encode_arrays({"w": np.zeros((2, 3), np.float32)}))
    with pytest.raises(WireError, match=r"'w' is float32\[2, 3\], expected float32\[3, 2\]"):
        decode_arrays(chunks, expected=manifest_of({"w": np.zeros((3, 2), np.float32)}))


def test_unexpected_missing_and_bad_dtype():
    expected = manifest_of({"w": np.zeros(2, np.float32)})
    with pytest.raises(WireError, match="unexpected tensor 'x'"):
        decode_arrays(encode_arrays({"x": np.zeros(2, np.float32)}), expected=expected)
    with pytest.raises(WireError, match=r"missing tensor\(s\) \['w'\]"):
        decode_arrays([], expected=expected)
    bad = pb.TensorChunk(name="w", dtype="object", shape=[1], total_bytes=8, data=b"\0" * 8)
    with pytest.raises(WireError, match="dtype 'object' is not allowed"):
        decode_arrays([bad])


def test_truncated_reordered_and_oversized_streams():
    chunks = list(encode_arrays({"w": np.zeros(1000, np.float32)}, chunk_bytes=1000))
    with pytest.raises(WireError, match="got 3000 of 4000 bytes"):
        decode_arrays(chunks[:3])
    with pytest.raises(WireError, match="out of order"):
        decode_arrays([chunks[1], chunks[0]])
    with pytest.raises(WireError, match="exceed the limit"):
        decode_arrays(chunks, max_total_bytes=100)
    lying = pb.TensorChunk(name="w", dtype="float32", shape=[10], total_bytes=4, data=b"\0" * 4)
    with pytest.raises(WireError, match="total_bytes 4 does not match"):
        decode_arrays([lying])


def test_nan_updates_are_refused():
    with pytest.raises(WireError, match=r"\['b'\] contain NaN"):
        require_finite({"a": np.zeros(2), "b": np.array([1.0, np.nan])})


def test_values_and_digest():
    values = {"n": 3, "loss": 0.5, "name": "x", "flag": True}
    assert decode_values(encode_values(values)) == values
    with pytest.raises(WireError, match="only bool, int, float and str"):
        encode_values({"x": [1, 2]})
    a = list(encode_arrays({"w": np.ones(3, np.float32)}))
    b = list(encode_arrays({"w": np.array([1, 1, 2], np.float32)}))
    assert payload_digest(a) == payload_digest(list(a)) != payload_digest(b)
