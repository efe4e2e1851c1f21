"""Measuring kernels on another machine (an ARM board) through a TVM RPC tracker: ``HOST:PORT:KEY`` names the
tracker and the key its servers registered under (``python -m tvm.exec.rpc_server --tracker HOST:PORT --key
KEY`` on the board)."""
from __future__ import annotations

import socket
from dataclasses import dataclass

from int8mt.errors import UserError

SUMMARY_TIMEOUT_S = 10.0  # for the tracker to answer at all


@dataclass(frozen=True)
class RPCTracker:
    host: str
    port: int
    key: str

    @classmethod
    def parse(cls, text: str) -> RPCTracker:
        """``HOST:PORT:KEY``, e.g. ``127.0.0.1:9190:pi5``."""
        host, _, rest = text.partition(":")
        port, _, key = rest.partition(":")
        if not (host and port.isdigit() and key):
            raise UserError(f"--rpc {text!r}: expected HOST:PORT:KEY, the RPC tracker's address and the key its "
                            "board's server registered with (e.g. 127.0.0.1:9190:pi5)")
        return cls(host, int(port), key)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}:{self.key}"

    def connect(self):  # -> tvm.rpc.RPCSession
        """A session on a server of this key (waiting while all are busy), once :meth:`check` passes."""
        return self.check().request(self.key, priority=1)

    def check(self):  # -> tvm.rpc.TrackerSession
        """The tracker, once it has answered that a server has this key: a request for a key nobody serves would
        wait forever."""
        from tvm import rpc

        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(SUMMARY_TIMEOUT_S)
        try:
            socket.create_connection((self.host, self.port)).close()  # TVM's own connect retries for a minute
            tracker = rpc.connect_tracker(self.host, self.port)
            queues = tracker.summary()["queue_info"]
        except (OSError, RuntimeError) as err:
            raise UserError(f"no RPC tracker answers at {self.host}:{self.port} ({err}); start one with "
                            "`python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port PORT`") from None
        finally:
            socket.setdefaulttimeout(previous)
        if self.key not in queues:
            known = ", ".join(sorted(queues)) or "none"
            raise UserError(f"no server with key {self.key!r} is registered at the tracker {self.host}:{self.port} "
                            f"(keys there: {known}); on the board run `python -m tvm.exec.rpc_server --tracker "
                            f"{self.host}:{self.port} --key {self.key}`")
        return tracker
