"""A TVM RPC server that serves from this process, registered at a tracker: ``python rpc_server.py --tracker
HOST:PORT --key KEY``. TVM's stock server (``python -m tvm.exec.rpc_server``, what a board runs) starts its
listener by re-executing ``sys.executable``, which fails under qemu-user without binfmt_misc ("Exec format
error"); its listener itself works here. Each session forks a worker, as on a board."""
import argparse
import threading

import tvm  # noqa: F401  (TVM's runtime library: TVM_USE_RUNTIME_LIB=1)
from tvm.rpc.server import PopenRPCServerState

parser = argparse.ArgumentParser()
parser.add_argument("--tracker", required=True, help="HOST:PORT")
parser.add_argument("--key", required=True)
parser.add_argument("--port", type=int, default=9091)
args = parser.parse_args()
host, port = args.tracker.rsplit(":", 1)
server = PopenRPCServerState("127.0.0.1", args.port, args.port + 100, tracker_addr=(host, int(port)), key=args.key,
                             custom_addr="127.0.0.1", silent=True)
print("serving on port", server.port, flush=True)
threading.Event().wait()
