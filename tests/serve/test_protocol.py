"""The Open Inference Protocol (KServe v2) codec on its own: pure functions, no server.

Requests in JSON and in the binary tensor data extension, of every datatype, parse into the arrays they describe;
responses encode back to JSON or binary, and every refusal names what is wrong.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from typing import Any

import numpy as np
import pytest

from cvdeploy.errors import InputError, OutputNotRepresentableError, PayloadTooLargeError
from cvdeploy.serve.protocol import (
    DTYPES,
    HEADER,
    MAX_DIMS,
    MAX_ELEMENTS,
    InferRequest,
    decompress,
    encode_response,
    load_json,
    parse_request,
)

NUMERIC = sorted(DTYPES)


def _values(dt: str) -> np.ndarray:
    """A 2x3 tensor of `dt` reaching its extremes (what a lossy conversion would get wrong first)."""
    t = np.dtype(DTYPES[dt])
    if dt == "BOOL":
        flat = [True, False, False, True, True, False]
    elif t.kind in "iu":
        info = np.iinfo(t)
        flat = [int(info.min), int(info.max), 0, 1, int(info.max) - 1, 7]
    else:
        info = np.finfo(t)
        flat = [float(info.max), float(-info.max), float(info.tiny), -0.5, 0.0, 3.25]
    return np.array(flat, dtype=t).reshape(2, 3)


def _json_request(*inputs: dict[str, Any], **doc: Any) -> bytes:
    return json.dumps({"inputs": list(inputs), **doc}).encode()


def _binary_request(tensors: list[tuple[str, str, list[int], bytes]], *, json_inputs: tuple[dict, ...] = (),
                    **doc: Any) -> tuple[bytes, str]:
    """A request in the binary extension: the JSON header, then each tensor's bytes in input order."""
    inputs = [{"name": n, "shape": s, "datatype": dt, "parameters": {"binary_data_size": len(raw)}} for n, dt, s, raw in tensors]
    head = json.dumps({"inputs": [*inputs, *json_inputs], **doc}).encode()
    return head + b"".join(raw for *_, raw in tensors), str(len(head))


def _bytes_raw(elements: list[bytes]) -> bytes:
    return b"".join(len(e).to_bytes(4, "little") + e for e in elements)


def _split(body: bytes, header_length: int | None) -> tuple[dict, bytes]:
    if header_length is None:
        return json.loads(body), b""
    return json.loads(body[:header_length]), body[header_length:]


# --- requests: every datatype, JSON and binary ------------------------------------------------------------------


@pytest.mark.parametrize("dt", NUMERIC)
def test_json_tensors_of_every_datatype_round_trip(dt: str) -> None:
    want = _values(dt)
    req = parse_request(_json_request({"name": "x", "shape": [2, 3], "datatype": dt, "data": want.reshape(-1).tolist()}), None)
    got = req.inputs["x"]
    assert got.dtype == want.dtype and got.shape == (2, 3)
    np.testing.assert_array_equal(got, want)
    assert req.datatypes == {"x": dt}
    # and back out, as JSON
    body, header_length = encode_response("m", "1", None, {"x": got}, [], False)
    assert header_length is None
    (out,) = json.loads(body)["outputs"]
    assert out == {"name": "x", "datatype": dt, "shape": [2, 3], "data": want.reshape(-1).tolist()}
    np.testing.assert_array_equal(np.asarray(out["data"], DTYPES[dt]).reshape(out["shape"]), want)


@pytest.mark.parametrize("dt", NUMERIC)
def test_json_data_may_be_nested_like_the_shape(dt: str) -> None:
    want = _values(dt)
    req = parse_request(_json_request({"name": "x", "shape": [2, 3], "datatype": dt, "data": want.tolist()}), None)
    np.testing.assert_array_equal(req.inputs["x"], want)


@pytest.mark.parametrize("dt", NUMERIC)
def test_binary_tensors_of_every_datatype_round_trip(dt: str) -> None:
    want = _values(dt)
    body, header_length = _binary_request([("x", dt, [2, 3], want.tobytes())])
    got = parse_request(body, header_length).inputs["x"]
    assert got.dtype == want.dtype and got.shape == (2, 3)
    np.testing.assert_array_equal(got, want)
    # and back out, in binary: a header, then exactly the tensor's bytes
    out_body, n = encode_response("m", "1", None, {"x": got}, [], True)
    assert n is not None
    doc, binary = _split(out_body, n)
    assert doc["outputs"] == [{"name": "x", "datatype": dt, "shape": [2, 3], "parameters": {"binary_data_size": want.nbytes}}]
    assert binary == want.tobytes()
    np.testing.assert_array_equal(np.frombuffer(binary, DTYPES[dt]).reshape(2, 3), want)


def test_json_bytes_elements_are_utf8_encoded_strings() -> None:
    req = parse_request(_json_request({"name": "s", "shape": [2, 2], "datatype": "BYTES", "data": [["héllo", ""], ["a", "☃"]]}), None)
    s = req.inputs["s"]
    assert s.dtype == object and s.shape == (2, 2)
    assert s.tolist() == [["héllo".encode(), b""], [b"a", "☃".encode()]]
    assert req.datatypes == {"s": "BYTES"}


def test_binary_bytes_elements_round_trip_with_their_length_prefixes() -> None:
    elements = [b"\x89PNG\r\n\x1a\n", b"", b"\x00\xff\x00", b"x" * 300]  # any bytes, empty ones and long ones
    raw = _bytes_raw(elements)
    body, header_length = _binary_request([("img", "BYTES", [2, 2], raw)])
    s = parse_request(body, header_length).inputs["img"]
    assert s.dtype == object and s.shape == (2, 2) and s.reshape(-1).tolist() == elements
    # binary out: the same length-prefixed layout
    out_body, n = encode_response("m", "1", None, {"img": s}, [], True)
    doc, binary = _split(out_body, n)
    assert doc["outputs"] == [{"name": "img", "datatype": "BYTES", "shape": [2, 2], "parameters": {"binary_data_size": len(raw)}}]
    assert binary == raw
    # JSON out: each element as text, invalid UTF-8 replaced rather than failing the answer
    out_body, n = encode_response("m", "1", None, {"img": s}, [], False)
    assert n is None
    (out,) = json.loads(out_body)["outputs"]
    assert out["datatype"] == "BYTES" and out["data"] == [e.decode("utf-8", "replace") for e in elements]


def test_object_outputs_that_are_not_bytes_are_written_as_text() -> None:
    labels = np.array(["circle", 3], dtype=object)
    out_body, _ = encode_response("m", "1", None, {"label": labels}, [], False)
    assert json.loads(out_body)["outputs"][0]["data"] == ["circle", "3"]


def test_binary_data_size_accounting_follows_input_order() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([[1, -2]], dtype=np.int16)
    s = _bytes_raw([b"one", b"two!"])
    body, header_length = _binary_request(
        [("a", "FP32", [2, 3], a.tobytes()), ("empty", "UINT8", [0, 3], b""), ("s", "BYTES", [2], s), ("b", "INT16", [1, 2], b.tobytes())],
        json_inputs=({"name": "j", "shape": [2], "datatype": "INT32", "data": [5, 6]},),  # JSON and binary inputs mixed
    )
    req = parse_request(body, header_length)
    assert list(req.inputs) == ["a", "empty", "s", "b", "j"]
    np.testing.assert_array_equal(req.inputs["a"], a)
    assert req.inputs["empty"].shape == (0, 3) and req.inputs["empty"].dtype == np.uint8
    assert req.inputs["s"].tolist() == [b"one", b"two!"]
    np.testing.assert_array_equal(req.inputs["b"], b)
    np.testing.assert_array_equal(req.inputs["j"], np.array([5, 6], np.int32))
    assert req.datatypes == {"a": "FP32", "empty": "UINT8", "s": "BYTES", "b": "INT16", "j": "INT32"}
    assert len(body) - int(header_length) == a.nbytes + len(s) + b.nbytes  # every byte claimed, none twice


def test_the_header_length_splits_json_from_binary_data() -> None:
    x = np.array([1.5, -2.0], np.float32)
    body, header_length = _binary_request([("x", "FP32", [2], x.tobytes())])
    np.testing.assert_array_equal(parse_request(body, header_length).inputs["x"], x)
    # Without the header length the whole body is taken for JSON: the binary tail makes it invalid.
    with pytest.raises(InputError, match=r"^the request is not valid JSON: "):
        parse_request(body, None)
    # A pure JSON body may still say so: its length is the whole body.
    plain = _json_request({"name": "x", "shape": [2], "datatype": "FP32", "data": [1.5, -2.0]})
    np.testing.assert_array_equal(parse_request(plain, str(len(plain))).inputs["x"], x)


def test_request_fields_are_kept() -> None:
    body = _json_request(
        {"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]},
        id="req-7",
        outputs=[{"name": "y", "parameters": {"binary_data": True}}, {"name": "z"}],
        parameters={"binary_data_output": True, "conf": 0.4},
    )
    req = parse_request(body, None)
    assert isinstance(req, InferRequest)
    assert req.id == "req-7"
    assert req.outputs == [{"name": "y", "parameters": {"binary_data": True}}, {"name": "z"}]
    assert req.binary_output is True and req.parameters == {"binary_data_output": True, "conf": 0.4}
    bare = parse_request(_json_request({"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}, id=42), None)
    assert bare.id is None and bare.outputs == [] and bare.binary_output is False and bare.parameters == {}  # a non-string id is dropped


# --- responses --------------------------------------------------------------------------------------------------

Y = np.array([[0.25, 0.5]], np.float32)
Z = np.array([3, 4, 5], np.int64)


def test_a_json_response_carries_data_and_no_header_length() -> None:
    body, header_length = encode_response("yolo", "2", "req-1", {"y": Y, "z": Z}, [], False)
    assert header_length is None
    assert json.loads(body) == {
        "model_name": "yolo", "model_version": "2", "id": "req-1",
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 2], "data": [0.25, 0.5]},
                    {"name": "z", "datatype": "INT64", "shape": [3], "data": [3, 4, 5]}],
    }
    body, _ = encode_response("yolo", "2", None, {"y": Y}, [], False)
    assert "id" not in json.loads(body)


def test_a_binary_response_has_a_json_header_of_the_stated_length_then_the_tensors_in_order() -> None:
    body, header_length = encode_response("yolo", "2", "r", {"y": Y, "z": Z}, [{"name": "z"}, {"name": "y"}], True)
    _, end = json.JSONDecoder().raw_decode(body.decode("latin-1"))  # the JSON is ASCII: characters are bytes
    assert header_length == end  # the JSON document ends exactly where the binary data begins
    doc, binary = _split(body, header_length)
    assert [o["name"] for o in doc["outputs"]] == ["z", "y"]  # the asked order
    assert [o["parameters"]["binary_data_size"] for o in doc["outputs"]] == [Z.nbytes, Y.nbytes]
    assert all("data" not in o for o in doc["outputs"])
    assert binary == Z.tobytes() + Y.tobytes()
    assert HEADER == "inference-header-content-length"  # the header the server sends this length in


@pytest.mark.parametrize("binary_default", [False, True])
def test_outputs_binary_data_overrides_the_request_wide_default(binary_default: bool) -> None:
    requested = [{"name": "y", "parameters": {"binary_data": not binary_default}}, {"name": "z"}]
    body, header_length = encode_response("m", "1", None, {"y": Y, "z": Z}, requested, binary_default)
    assert header_length is not None  # one of the two is binary either way
    doc, binary = _split(body, header_length)
    y, z = doc["outputs"]
    binary_one, json_one, raw = (z, y, Z.tobytes()) if binary_default else (y, z, Y.tobytes())
    assert binary_one["parameters"] == {"binary_data_size": len(raw)} and "data" not in binary_one
    assert "parameters" not in json_one and json_one["data"] == (Y if binary_default else Z).reshape(-1).tolist()
    assert binary == raw


def test_requested_outputs_parsed_from_a_request_drive_the_response() -> None:
    body = _json_request({"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]},
                         outputs=[{"name": "z", "parameters": {"binary_data": True}}])
    req = parse_request(body, None)
    out, n = encode_response("m", "1", req.id, {"y": Y, "z": Z}, req.outputs, req.binary_output)
    doc, binary = _split(out, n)
    assert [o["name"] for o in doc["outputs"]] == ["z"] and binary == Z.tobytes()  # only what was asked


def test_an_unknown_requested_output_is_refused() -> None:
    with pytest.raises(InputError, match=re.escape("unknown output 'boxes'; the model has y, z")):
        encode_response("m", "1", None, {"y": Y, "z": Z}, [{"name": "boxes"}], False)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_cannot_go_in_json_but_can_in_binary(bad: float) -> None:
    y = np.array([1.0, bad], np.float32)
    with pytest.raises(OutputNotRepresentableError, match="NaN or inf") as caught:
        encode_response("m", "1", None, {"y": y}, [], False)
    assert isinstance(caught.value, InputError) and "binary_data_output" in str(caught.value)  # says what to do instead
    body, n = encode_response("m", "1", None, {"y": y}, [], True)
    np.testing.assert_array_equal(np.frombuffer(_split(body, n)[1], np.float32), y)


# --- decompress ------------------------------------------------------------------------------------------------

PAYLOAD = json.dumps({"inputs": [{"name": "x", "shape": [64], "datatype": "FP32", "data": [0.5] * 64}]}).encode()


@pytest.mark.parametrize("encoding", [None, "", "identity", "IDENTITY"])
def test_an_uncompressed_body_is_returned_as_is(encoding: str | None) -> None:
    assert decompress(PAYLOAD, encoding, 10) == PAYLOAD  # untouched, and no limit: the body's own limit applied before


@pytest.mark.parametrize(("encoding", "compress"), [("gzip", gzip.compress), ("GZip", gzip.compress), ("deflate", zlib.compress)])
def test_gzip_and_deflate_bodies_are_inflated(encoding: str, compress) -> None:
    assert decompress(compress(PAYLOAD), encoding, len(PAYLOAD)) == PAYLOAD  # a limit equal to the size still passes


def test_a_decompression_bomb_is_refused_past_the_limit() -> None:
    bomb = gzip.compress(b"\0" * (16 << 20))  # 16 MiB of zeros in about 16 KiB
    assert len(bomb) < 1 << 15
    with pytest.raises(PayloadTooLargeError, match=re.escape("the decompressed body is larger than the limit (1048576 bytes)")):
        decompress(bomb, "gzip", 1 << 20)
    with pytest.raises(PayloadTooLargeError, match=r"larger than the limit \(1023 bytes\)"):
        decompress(zlib.compress(b"\0" * 1024), "deflate", 1023)  # one byte over is over
    assert decompress(zlib.compress(b"\0" * 1024), "deflate", 1024) == b"\0" * 1024


def test_an_unsupported_or_broken_encoding_is_refused() -> None:
    with pytest.raises(InputError, match=re.escape("unsupported Content-Encoding 'br' (gzip, deflate)")):
        decompress(PAYLOAD, "br", 1 << 20)
    with pytest.raises(InputError, match=r"the gzip body cannot be decompressed: Error -3"):
        decompress(b"definitely not gzip", "gzip", 1 << 20)
    with pytest.raises(InputError, match=r"the deflate body cannot be decompressed: Error -3"):
        decompress(gzip.compress(PAYLOAD), "deflate", 1 << 20)  # gzip framing sent as deflate


# --- load_json ---------------------------------------------------------------------------------------------------


def test_load_json_reads_bytes_and_text() -> None:
    assert load_json(b'{"a": [1, 2.5, "x"]}') == {"a": [1, 2.5, "x"]}
    assert load_json('{"a": null}') == {"a": None}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"a": 1', r"^the request is not valid JSON: Expecting ',' delimiter: line 1 column 8 \(char 7\)$"),
        (b"", r"^the request is not valid JSON: Expecting value"),
        (b"\xff\xfe{}", r"^the request is not valid JSON: "),  # not UTF-8
        (b"[" * 200_000 + b"]" * 200_000, r"^the request is nested too deeply$"),  # would exhaust the C stack
        (b'{"n": ' + b"9" * 5000 + b"}", r"^the request is not valid JSON: Exceeds the limit \(4300 digits\)"),
    ],
    ids=["syntax", "empty", "bad-utf8", "deep", "huge-int"],
)
def test_load_json_turns_every_failure_into_an_input_error(data: bytes, message: str) -> None:
    with pytest.raises(InputError, match=message) as caught:
        load_json(data)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 260  # one short line, whatever the parser said


def test_load_json_names_what_it_was_reading() -> None:
    with pytest.raises(InputError, match=r"^the key request is not valid JSON"):
        load_json(b"nope", "the key request")


# --- refusals: every InputError of parse_request --------------------------------------------------------------


def _inp(**fields: Any) -> dict[str, Any]:
    return {"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0], **fields}


def _bin(dt: str, shape: list[int], raw: bytes, *, extra: bytes = b"") -> tuple[bytes, str]:
    body, n = _binary_request([("x", dt, shape, raw)])
    return body + extra, n


def _binary_size(size: Any) -> tuple[bytes, str]:
    """Eight bytes of binary data behind an input that claims `size` of them."""
    head = json.dumps({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": size}}]})
    return head.encode() + b"\0" * 8, str(len(head))


NAME_SHAPE = "needs a string name, a datatype and a shape of non-negative integers"

# (id, (body, Inference-Header-Content-Length), the start of the message): one row per way parse_request refuses.
REFUSALS: list[tuple[str, tuple[bytes, str | None], str]] = [
    ("header-not-int", (b"{}", "12a"), "Inference-Header-Content-Length must be an integer, got '12a'"),
    ("header-negative", (b"{}", "-1"), "Inference-Header-Content-Length -1 is outside the body (2 bytes)"),
    ("header-past-body", (b"{}", "3"), "Inference-Header-Content-Length 3 is outside the body (2 bytes)"),
    ("not-json", (b"{inputs", None), "the request is not valid JSON: Expecting property name enclosed in double quotes"),
    ("nested-too-deeply", (b"[" * 200_000, None), "the request is nested too deeply"),
    ("not-an-object", (b"[]", None), "the request needs an 'inputs' list with at least one tensor"),
    ("no-inputs", (b"{}", None), "the request needs an 'inputs' list with at least one tensor"),
    ("inputs-not-a-list", (b'{"inputs": {"name": "x"}}', None), "the request needs an 'inputs' list with at least one tensor"),
    ("inputs-empty", (b'{"inputs": []}', None), "the request needs an 'inputs' list with at least one tensor"),
    ("input-not-an-object", (b'{"inputs": [["x"]]}', None), "each input must be an object with name, shape, datatype and data"),
    ("name-not-a-string", (_json_request(_inp(name=3)), None), f"input 3: {NAME_SHAPE}"),
    ("no-name", (_json_request(_inp(name=None)), None), f"input None: {NAME_SHAPE}"),
    ("no-datatype", (_json_request(_inp(datatype=None)), None), f"input 'x': {NAME_SHAPE}"),
    ("shape-not-a-list", (_json_request(_inp(shape=2)), None), f"input 'x': {NAME_SHAPE}"),
    ("shape-negative", (_json_request(_inp(shape=[-2])), None), f"input 'x': {NAME_SHAPE}"),
    ("shape-float", (_json_request(_inp(shape=[2.0])), None), f"input 'x': {NAME_SHAPE}"),
    ("shape-bool", (_json_request(_inp(shape=[True, True])), None), f"input 'x': {NAME_SHAPE}"),
    ("too-many-dims", (_json_request(_inp(shape=[1] * (MAX_DIMS + 1), data=[1.0])), None),
     f"input 'x': shape {[1] * (MAX_DIMS + 1)} has more than {MAX_DIMS} dimensions"),
    ("too-many-elements", (_json_request(_inp(shape=[1 << 14, 1 << 14, 2], data=[])), None),
     f"input 'x': shape [16384, 16384, 2] is too large (at most {MAX_ELEMENTS} elements)"),
    ("elements-past-int64", (_json_request(_inp(shape=[1 << 62, 1 << 62, 4], data=[])), None),  # numpy's product would wrap
     f"input 'x': shape [{1 << 62}, {1 << 62}, 4] is too large (at most {MAX_ELEMENTS} elements)"),
    ("parameters-not-an-object", (_json_request(_inp(parameters=[1])), None), "input 'x': 'parameters' must be an object"),
    ("no-data", (_json_request(_inp(data=None)), None), "input 'x': no 'data' and no binary_data_size"),
    ("unknown-datatype", (_json_request(_inp(datatype="FP8")), None), "input 'x': unknown datatype 'FP8'"),
    ("data-not-numbers", (_json_request(_inp(data=["a", "b"])), None),
     "input 'x': data is not FP32: could not convert string to float: 'a'"),
    ("data-ragged", (_json_request(_inp(data=[[1.0], [2.0, 3.0]])), None), "input 'x': data is not FP32: setting an array element"),
    ("data-out-of-range", (_json_request(_inp(datatype="UINT8", data=[1, 300])), None),
     "input 'x': data is not UINT8: Python integer 300 out of bounds for uint8"),
    ("data-negative-unsigned", (_json_request(_inp(datatype="UINT16", data=[-1, 0])), None),
     "input 'x': data is not UINT16: Python integer -1 out of bounds for uint16"),
    ("data-past-int64", (_json_request(_inp(datatype="INT64", data=[1, 1 << 63])), None), "input 'x': data is not INT64: "),
    ("data-object", (_json_request(_inp(data=[{"v": 1}, 2])), None), "input 'x': data is not FP32: "),
    ("data-count", (_json_request(_inp(data=[1.0, 2.0, 3.0])), None), "input 'x': 3 values for shape [2]"),
    ("bytes-json-count", (_json_request(_inp(datatype="BYTES", data=["a"])), None), "input 'x': 1 elements for shape [2]"),
    ("bytes-json-too-many", (_json_request(_inp(datatype="BYTES", data=["a", "b", "c", "d"])), None),
     "input 'x': 3 elements for shape [2]"),  # counting stops one past the shape: a huge list is never walked whole
    ("bytes-json-not-strings", (_json_request(_inp(datatype="BYTES", data=["a", 1])), None),
     "input 'x': BYTES data in JSON must be strings (base64 images go in binary form)"),
    ("given-twice", (_json_request(_inp(), _inp()), None), "input 'x' is given twice"),
    ("outputs-not-a-list", (_json_request(_inp(), outputs={"name": "y"}), None), "'outputs' must be a list of objects with a name"),
    ("output-without-name", (_json_request(_inp(), outputs=[{"parameters": {}}]), None),
     "'outputs' must be a list of objects with a name"),
    ("output-parameters", (_json_request(_inp(), outputs=[{"name": "y", "parameters": ["binary"]}]), None),
     "'outputs[].parameters' must be an object"),
    ("request-parameters", (_json_request(_inp(), parameters=["binary_data_output"]), None), "'parameters' must be an object"),
    # the binary extension
    ("binary-size-string", _binary_size("8"), "input 'x': binary_data_size 8 runs past the binary data"),
    ("binary-size-bool", _binary_size(True), "input 'x': binary_data_size True runs past the binary data"),
    ("binary-size-float", _binary_size(8.0), "input 'x': binary_data_size 8.0 runs past the binary data"),
    ("binary-size-negative", _binary_size(-1), "input 'x': binary_data_size -1 runs past the binary data"),
    ("binary-size-past-the-data", _binary_size(9), "input 'x': binary_data_size 9 runs past the binary data"),
    ("binary-unknown-datatype", _bin("FP8", [2], b"\0\0"), "input 'x': unknown datatype 'FP8'"),
    ("binary-wrong-size", _bin("FP32", [2], b"\0" * 6), "input 'x': 6 bytes of binary data, shape [2] FP32 needs 8"),
    ("binary-unclaimed-bytes", _bin("FP32", [2], b"\0" * 8, extra=b"\0\0\0"),
     "3 bytes of binary data are not claimed by any input"),
    ("bytes-truncated-length", _bin("BYTES", [2], _bytes_raw([b"ab"]) + b"\1\0"), "BYTES tensor: truncated element length"),
    ("bytes-element-too-long", _bin("BYTES", [1], (9).to_bytes(4, "little") + b"short"),
     "BYTES tensor: an element is longer than the data"),
    ("bytes-binary-count", _bin("BYTES", [3], _bytes_raw([b"a", b"b"])), "input 'x': 2 BYTES elements for shape [3]"),
]


@pytest.mark.parametrize(("body", "message"), [(b, m) for _, b, m in REFUSALS], ids=[i for i, _, _ in REFUSALS])
def test_every_refusal_names_what_is_wrong(body: tuple[bytes, str | None], message: str) -> None:
    with pytest.raises(InputError) as caught:
        parse_request(*body)
    assert type(caught.value) is InputError  # a client error (400), not a subclass with another status
    assert str(caught.value).startswith(message), str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_valid_twin_of_each_binary_refusal_is_accepted() -> None:
    """The refusals above fail for the one thing they break: the same requests done right parse."""
    body, n = _binary_size(8)
    np.testing.assert_array_equal(parse_request(body, n).inputs["x"], np.zeros(2, np.float32))
    body, n = _bin("BYTES", [2], _bytes_raw([b"ab", b"c"]))
    assert parse_request(body, n).inputs["x"].tolist() == [b"ab", b"c"]
    shape = [1] * MAX_DIMS  # at the limit: accepted
    assert parse_request(_json_request(_inp(shape=shape, data=[1.0])), None).inputs["x"].shape == tuple(shape)


def test_truncated_compressed_bodies_and_string_booleans_are_refused() -> None:
    import gzip
    import zlib

    from cvdeploy.serve.protocol import decompress, parse_request

    body = gzip.compress(b'{"inputs": []}' * 100)
    with pytest.raises(InputError, match="gzip body is truncated"):
        decompress(body[: len(body) // 2], "gzip", 1 << 20)
    with pytest.raises(InputError, match="deflate body is truncated"):
        decompress(zlib.compress(b"x" * 1000)[:-6], "deflate", 1 << 20)
    assert decompress(body, "gzip", 1 << 20) == b'{"inputs": []}' * 100
    t = {"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}
    with pytest.raises(InputError, match="binary_data' must be true or false"):
        parse_request(json.dumps({"inputs": [t], "outputs": [{"name": "y", "parameters": {"binary_data": "false"}}]}).encode(), None)
    with pytest.raises(InputError, match="binary_data_output' must be true or false"):
        parse_request(json.dumps({"inputs": [t], "parameters": {"binary_data_output": "false"}}).encode(), None)
    assert parse_request(json.dumps({"inputs": [t], "parameters": {"binary_data_output": True}}).encode(), None).binary_output
