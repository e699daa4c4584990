"""pyzmq's own calls under its Python wrappers, for the paths every message takes.

`zmq.Socket.send` checks its draft-API arguments in Python before it sends,
`zmq.Socket.getsockopt` turns the answer into an enum, and `zmq.Poller.poll` rebuilds
its socket list on every call. Each costs about a microsecond, several times per job, in
the daemon, its workers and its clients alike. The calls here are the Cython layer those
wrappers end in; their flags are plain ints for the same reason.
"""
from __future__ import annotations

import zmq

NOBLOCK, SNDMORE, POLLIN, EVENTS = (int(zmq.NOBLOCK), int(zmq.SNDMORE), int(zmq.POLLIN),
                                    int(zmq.EVENTS))

send = zmq.backend.Socket.send    # send(sock, data, flags)
get = zmq.backend.Socket.get      # get(sock, option) -> int
poll = zmq.backend.zmq_poll       # poll([(sock, POLLIN), ...], timeout_ms) -> [(sock, ev)]
