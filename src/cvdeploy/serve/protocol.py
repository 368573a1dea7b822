"""Open Inference Protocol (KServe v2) over HTTP: tensors in JSON and in the binary tensor data extension.

Pure functions, no web framework: parse a request body into named numpy arrays, and encode
outputs back into a JSON (+ binary) response body. The server's routes call these.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from cvdeploy.errors import InputError, OutputNotRepresentableError, PayloadTooLargeError

DTYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
          "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
          "FP32": np.float32, "FP64": np.float64}
NP_TO_V2 = {np.dtype(v).name: k for k, v in DTYPES.items()}
HEADER = "inference-header-content-length"
MAX_DIMS = 8
MAX_ELEMENTS = 1 << 28  # per tensor: 1 GiB of FP32


def load_json(data: bytes | str, what: str = "the request") -> Any:
    """`json.loads` for untrusted bodies: every way it can fail (bad syntax, bad UTF-8, nesting deep enough to exhaust
    the stack, an integer literal past Python's digit limit) is a client error, never a 500."""
    try:
        return json.loads(data)
    except RecursionError:
        raise InputError(f"{what} is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError; so is the int digit limit
        raise InputError(f"{what} is not valid JSON: {str(e).splitlines()[0][:200]}") from None


def _element_count(name: Any, shape: list[int]) -> int:
    """The element count in Python integers (numpy's int64 product wraps around silently) within the limits."""
    count = 1
    for d in shape:
        count *= d
        if count > MAX_ELEMENTS:
            raise InputError(f"input {name!r}: shape {shape} is too large (at most {MAX_ELEMENTS} elements)")
    return count


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]  # BYTES inputs are object arrays of bytes
    datatypes: dict[str, str]
    outputs: list[dict[str, Any]]  # requested outputs (name, parameters); empty: all
    binary_output: bool  # request-wide binary_data_output
    parameters: dict[str, Any]


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """gzip / deflate request bodies, refusing anything that inflates past `limit` bytes."""
    if not encoding or encoding.lower() == "identity":
        return body
    enc = encoding.lower()
    if enc not in ("gzip", "deflate"):
        raise InputError(f"unsupported Content-Encoding {encoding!r} (gzip, deflate)")
    d = zlib.decompressobj(wbits=31 if enc == "gzip" else 15)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as e:
        raise InputError(f"the {enc} body cannot be decompressed: {e}") from None
    if len(out) > limit:
        raise PayloadTooLargeError(f"the decompressed body is larger than the limit ({limit} bytes)")
    if not d.eof:  # the stream stopped before its end marker: a cut body, not a shorter request
        raise InputError(f"the {enc} body is truncated")
    return out


def _bytes_elements(raw: bytes) -> list[bytes]:
    """BYTES tensor in binary form: each element is a 4-byte little-endian length, then the bytes."""
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise InputError("BYTES tensor: truncated element length")
        n = int.from_bytes(raw[i : i + 4], "little")
        i += 4
        if i + n > len(raw):
            raise InputError("BYTES tensor: an element is longer than the data")
        out.append(raw[i : i + n])
        i += n
    return out


def parse_request(body: bytes, header_length: str | None) -> InferRequest:
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise InputError(f"Inference-Header-Content-Length must be an integer, got {header_length!r}") from None
        if n < 0 or n > len(body):
            raise InputError(f"Inference-Header-Content-Length {n} is outside the body ({len(body)} bytes)")
        head, binary = body[:n], body[n:]
    else:
        head, binary = body, b""
    doc = load_json(head)
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise InputError("the request needs an 'inputs' list with at least one tensor")
    inputs: dict[str, np.ndarray] = {}
    types: dict[str, str] = {}
    offset = 0
    for t in doc["inputs"]:
        if not isinstance(t, dict):
            raise InputError("each input must be an object with name, shape, datatype and data")
        name, shape, dt = t.get("name"), t.get("shape"), t.get("datatype")
        if not isinstance(name, str) or not isinstance(dt, str) or not isinstance(shape, list) or \
                not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise InputError(f"input {name!r}: needs a string name, a datatype and a shape of non-negative integers")
        if len(shape) > MAX_DIMS:
            raise InputError(f"input {name!r}: shape {shape} has more than {MAX_DIMS} dimensions")
        count = _element_count(name, shape)
        params = t.get("parameters")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise InputError(f"input {name!r}: 'parameters' must be an object")
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
                raise InputError(f"input {name!r}: binary_data_size {size} runs past the binary data")
            raw = binary[offset : offset + size]
            offset += size
            if dt == "BYTES":
                elems = _bytes_elements(raw)
                if len(elems) != count:
                    raise InputError(f"input {name!r}: {len(elems)} BYTES elements for shape {shape}")
                arr = np.empty(count, dtype=object)
                arr[:] = elems
                arr = arr.reshape(shape)
            else:
                if dt not in DTYPES:
                    raise InputError(f"input {name!r}: unknown datatype {dt!r}")
                want = count * np.dtype(DTYPES[dt]).itemsize
                if len(raw) != want:
                    raise InputError(f"input {name!r}: {len(raw)} bytes of binary data, shape {shape} {dt} needs {want}")
                arr = np.frombuffer(raw, dtype=DTYPES[dt]).reshape(shape)
        else:
            data = t.get("data")
            if data is None:
                raise InputError(f"input {name!r}: no 'data' and no binary_data_size")
            if dt == "BYTES":
                flat = _flatten(data, count + 1)
                if len(flat) != count:
                    raise InputError(f"input {name!r}: {len(flat)} elements for shape {shape}")
                if not all(isinstance(x, str) for x in flat):
                    raise InputError(f"input {name!r}: BYTES data in JSON must be strings (base64 images go in binary form)")
                arr = np.empty(count, dtype=object)
                arr[:] = [x.encode() for x in flat]
                arr = arr.reshape(shape)
            else:
                if dt not in DTYPES:
                    raise InputError(f"input {name!r}: unknown datatype {dt!r}")
                try:
                    arr = np.asarray(data, dtype=DTYPES[dt])
                except (TypeError, ValueError, OverflowError, RecursionError) as e:
                    raise InputError(f"input {name!r}: data is not {dt}: {str(e)[:200]}") from None
                if arr.size != count:
                    raise InputError(f"input {name!r}: {arr.size} values for shape {shape}")
                arr = arr.reshape(shape)
        if name in inputs:
            raise InputError(f"input {name!r} is given twice")
        inputs[name], types[name] = arr, dt
    if offset != len(binary):
        raise InputError(f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    outs = doc.get("outputs") or []
    if not isinstance(outs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outs):
        raise InputError("'outputs' must be a list of objects with a name")
    if not all(isinstance(o.get("parameters") or {}, dict) for o in outs):
        raise InputError("'outputs[].parameters' must be an object")
    if not all(isinstance((o.get("parameters") or {}).get("binary_data", False), bool) for o in outs):
        raise InputError("'outputs[].parameters.binary_data' must be true or false")  # "false" is a truthy string
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise InputError("'parameters' must be an object")
    if not isinstance(params.get("binary_data_output", False), bool):
        raise InputError("'parameters.binary_data_output' must be true or false")
    return InferRequest(doc.get("id") if isinstance(doc.get("id"), str) else None, inputs, types, outs,
                        bool(params.get("binary_data_output", False)), params)


def _flatten(x: Any, limit: int) -> list[Any]:
    """Nested lists flattened without recursion (a deep nesting must not exhaust the stack); stops past `limit`."""
    out: list[Any] = []
    stack = [iter([x])]
    while stack and len(out) < limit:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        else:
            out.append(item)
    return out


_END = object()


def encode_response(model: str, version: str, req_id: str | None, outputs: dict[str, np.ndarray],
                    requested: list[dict[str, Any]], binary_default: bool) -> tuple[bytes, int | None]:
    """The response body and, when it carries binary data, the JSON header's length."""
    wanted = requested or [{"name": n} for n in outputs]
    items, chunks = [], []
    for o in wanted:
        name = o["name"]
        if name not in outputs:
            raise InputError(f"unknown output {name!r}; the model has {', '.join(outputs)}")
        arr = outputs[name]
        params = o.get("parameters") or {}
        binary = bool(params.get("binary_data", binary_default))
        if arr.dtype == object:
            dt = "BYTES"
            elems = [e if isinstance(e, bytes) else str(e).encode() for e in arr.reshape(-1)]
            raw = b"".join(len(e).to_bytes(4, "little") + e for e in elems)
            data: Any = [e.decode("utf-8", "replace") for e in elems]
        else:
            dt = NP_TO_V2.get(arr.dtype.name)
            if dt is None:  # a model output of a type v2 has no name for (e.g. numpy strings)
                raise OutputNotRepresentableError(f"output {name!r} has dtype {arr.dtype.name}, which the v2 protocol cannot carry")
            raw = np.ascontiguousarray(arr).tobytes()
            data = arr.reshape(-1).tolist()
        item: dict[str, Any] = {"name": name, "datatype": dt, "shape": list(arr.shape)}
        if binary:
            item["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            item["data"] = data
        items.append(item)
    doc = {"model_name": model, "model_version": version, "outputs": items}
    if req_id is not None:
        doc["id"] = req_id
    try:
        head = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:  # NaN and inf have no JSON form: a bare NaN token would break every client's parser
        raise OutputNotRepresentableError("the model's output holds NaN or inf for these inputs, which JSON cannot carry: send inputs "
                                     "in the model's range (0..1 for images), or ask for binary output "
                                     "(parameters.binary_data_output)") from None
    if chunks:
        return head + b"".join(chunks), len(head)
    return head, None
