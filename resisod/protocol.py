"""The wire protocol: the one place that defines message shapes.

Every message is one ZeroMQ frame holding one msgpack map (no pickle, ever). The daemon, the
workers and every client import this module and nothing else defines ops, events or codes.

Client -> daemon ops carry ``rid`` (a request id the client picks); every event the daemon
sends back for that request echoes it, so one client connection can have many requests in
flight. A job streams zero or more PARTIAL events, then exactly one FINAL event. A `submit`
is answered first with `accepted` unless it says `ack: false`, in which case the final event
(carrying the task id) is its one reply. A `get` with `data: true` carries the result
file in chunks: `data` holds up to 4 MiB from `offset` (default 0), with `data_offset` and
`data_size`; the client asks again from the next offset until it has `data_size` bytes.
"""
from __future__ import annotations

import threading
from typing import Any

import msgpack

VERSION = 1

# Frames above this are refused by libzmq itself (the peer is disconnected, no reply possible);
# frames between MAX_REQUEST_BYTES and this get a `too_large` error. Two levels so that an
# oversized request still gets a readable answer in the common case.
HARD_FRAME_LIMIT = 64 * 1024 * 1024
MAX_REQUEST_BYTES = 1024 * 1024


class Op:
    # client -> daemon
    SUBMIT = "submit"
    WATCH = "watch"
    CANCEL = "cancel"
    GET = "get"
    STATUS = "status"
    JOBS = "jobs"
    PING = "ping"
    # a streaming client's liveness signal while it waits on a job (or a monitor)
    ALIVE = "alive"
    # a live view: a `status` event (the status answer plus recent jobs) every interval_ms
    MONITOR = "monitor"


def _values(cls: type) -> frozenset[str]:
    return frozenset(v for k, v in vars(cls).items() if k.isupper() and isinstance(v, str))


CLIENT_OPS = _values(Op)


class Event:
    ACCEPTED = "accepted"
    QUEUED = "queued"
    STARTED = "started"
    PROGRESS = "progress"
    TOKEN = "token"
    AUDIO = "audio"
    PAUSED = "paused"
    RESUMED = "resumed"
    STATUS = "status"        # a monitor's snapshot
    # finals
    RESULT = "result"
    ERROR = "error"
    CANCELLED = "cancelled"


FINAL_EVENTS = frozenset({Event.RESULT, Event.ERROR, Event.CANCELLED})


class WorkerMsg:
    # worker -> daemon
    HELLO = "hello"          # connected, engine loading
    READY = "ready"          # engine loaded, capacity free
    LOAD_FAILED = "load_failed"
    HEARTBEAT = "heartbeat"
    PARTIAL = "partial"      # a token / progress / audio event of the running job
    DONE = "done"
    FAILED = "failed"
    UNLOADED = "unloaded"    # idle unload after keep_alive_s
    RELOADED = "reloaded"    # loaded again for the job it was given
    # daemon -> worker
    RUN = "run"
    CANCEL = "cancel"
    PAUSE = "pause"
    RESUME = "resume"
    SHUTDOWN = "shutdown"
    # daemon -> remote worker, the answer to its hello: its domain's settings, or a refusal
    # (`code`, `message`); a remote worker's hello names its `domain`
    SPEC = "spec"
    REFUSED = "refused"


# A daemon heartbeat to a remote worker carries `t` (the daemon's clock); the worker's
# heartbeat thread echoes it back at once as `echo`, and the difference is the round trip.
HEARTBEAT_TIME, HEARTBEAT_ECHO = "t", "echo"

# a worker's heartbeat socket has its job socket's identity plus this suffix
HEARTBEAT_SUFFIX = b"/hb"


class Code:
    """Stable error codes. Clients and scripts may match on these strings."""


    BAD_REQUEST = "bad_request"
    UNKNOWN_OP = "unknown_op"
    TOO_LARGE = "too_large"
    QUEUE_FULL = "queue_full"
    NOT_FOUND = "not_found"
    MODEL_NOT_FOUND = "model_not_found"   # OpenAI's code for a model nobody serves
    ENGINE_UNAVAILABLE = "engine_unavailable"
    CONTEXT_OVERFLOW = "context_overflow"
    TIMEOUT = "timeout"
    WORKER_CRASHED = "worker_crashed"
    MEMORY_LIMIT = "memory_limit"
    INTERRUPTED = "interrupted"
    SHUTTING_DOWN = "shutting_down"
    CANCELLED = "cancelled"
    UNSUPPORTED_VERSION = "unsupported_version"
    ENGINE_ERROR = "engine_error"
    STORAGE_FULL = "storage_full"
    GPU_OOM = "gpu_oom"                  # a job asked for more GPU memory than its worker has
    UNKNOWN_DOMAIN = "unknown_domain"     # a remote worker's hello names no configured domain


class Priority:
    REALTIME = "realtime"
    NORMAL = "normal"
    BATCH = "batch"


PRIORITY_ORDER = (Priority.REALTIME, Priority.NORMAL, Priority.BATCH)


class JobState:
    QUEUED = "queued"        # accepted, waiting for a worker
    RUNNING = "running"      # a worker has it (possibly paused by preemption)
    # finished states come last; nothing leaves them
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED_STATES = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})

KIND_PREFIX = {"llm": "llm", "tts": "tts", "image": "img", "null": "nul"}


class ProtocolError(Exception):
    """A message that cannot be accepted; carries the stable code sent back to the peer."""

    def __init__(self, code: Code, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


_packers = threading.local()


def pack(msg: Any) -> bytes:
    """msgpack bytes of `msg`. `msgpack.packb` builds a Packer (and its buffer) per call; a
    Packer kept per thread packs the same bytes in a third of the time."""
    try:
        packer = _packers.packer
    except AttributeError:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    return packer.pack(msg)


def unpack(frame: bytes, *, max_bytes: int = MAX_REQUEST_BYTES) -> dict[str, Any]:
    """Decode one frame into a map or raise ProtocolError with the code to answer with."""
    if len(frame) > max_bytes:
        raise ProtocolError(Code.TOO_LARGE,
                            f"frame of {len(frame)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=True,
                              max_bin_len=max_bytes, max_str_len=max_bytes,
                              max_array_len=65536, max_map_len=4096)
    except Exception as exc:  # msgpack raises a zoo of types for garbage input
        raise ProtocolError(Code.BAD_REQUEST, f"frame is not valid msgpack: {type(exc).__name__}")
    if not isinstance(msg, dict):
        raise ProtocolError(Code.BAD_REQUEST,
                            f"a message must be a msgpack map, got {type(msg).__name__}")
    return msg


def request(op: str, rid: int, **fields: Any) -> dict[str, Any]:
    return {"v": VERSION, "op": op, "rid": rid, **fields}


def event(name: str, rid: Any, **fields: Any) -> dict[str, Any]:
    return {"v": VERSION, "event": name, "rid": rid, **fields}


def error(rid: Any, code: str, message: str, **fields: Any) -> dict[str, Any]:
    return event(Event.ERROR, rid, code=code, message=message, **fields)


def check_request(msg: dict[str, Any]) -> tuple[str, Any]:
    """Validate the envelope of a client request; return (op, rid)."""
    rid = msg.get("rid")
    if rid is not None and not isinstance(rid, (int, str)):
        raise ProtocolError(Code.BAD_REQUEST, "field 'rid' must be an integer or a string")
    v = msg.get("v", VERSION)
    if v != VERSION:
        raise ProtocolError(Code.UNSUPPORTED_VERSION,
                            f"protocol version {v!r} is not supported; this daemon speaks {VERSION}")
    op = msg.get("op")
    if not isinstance(op, str):
        raise ProtocolError(Code.BAD_REQUEST, "field 'op' is missing or not a string")
    if op not in CLIENT_OPS:
        raise ProtocolError(Code.UNKNOWN_OP,
                            f"unknown op {op!r}; known ops: {', '.join(sorted(CLIENT_OPS))}")
    return op, rid


def field(msg: dict[str, Any], name: str, types: type | tuple[type, ...], *,
          required: bool = False, default: Any = None) -> Any:
    """Read a typed field from a request, raising bad_request with the field's name."""
    value = msg.get(name)
    if value is None:
        if required:
            raise ProtocolError(Code.BAD_REQUEST, f"field '{name}' is required")
        return default
    if type(value) is types:  # the common case: exactly the type asked for
        return value
    # bool is an int in Python; never accept it where a number is meant
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ProtocolError(Code.BAD_REQUEST, f"field '{name}' has the wrong type (bool)")
    if not isinstance(value, types):
        want = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise ProtocolError(Code.BAD_REQUEST,
                            f"field '{name}' must be {want}, got {type(value).__name__}")
    return value
