"""Bundle workers of a CUDA bundle on Ray: the layout takes the cluster's GPUs (a worker per free GPU, or even shares
of them), the workers ask Ray for their share, and a cluster without a free GPU, or workers that cannot load the
bundle (or a server whose port is taken), are refused with the reason instead of waiting forever or failing with
Ray's traceback."""
import copy
import json
import shutil
import socket
import subprocess
import sys

import pytest

pytest.importorskip("ray.serve")

from int8mt.errors import UserError  # noqa: E402
from int8mt.runtime.bundle import read_manifest  # noqa: E402
from int8mt.serving.cluster import GPU_SHARES, WorkerLayout, worker_error, worker_options  # noqa: E402
from tests.conftest import ROOT, as_cuda_sm90, edit_manifest  # noqa: E402

GPU_MESSAGE = "needs an NVIDIA GPU of compute capability 9.0 or newer; no CUDA GPU is visible"


class Cluster:
    """What :meth:`WorkerLayout.fit` asks of Ray: the free and the total resources (Ray lists no GPU key where
    there are none)."""

    def __init__(self, cpus: float, gpus: float, total_gpus: float | None = None) -> None:
        self.free = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
        self.total = {"CPU": cpus, **({"GPU": total_gpus or gpus} if total_gpus or gpus else {})}

    def available_resources(self) -> dict:
        return self.free

    def cluster_resources(self) -> dict:
        return self.total


@pytest.fixture(scope="module")
def cuda_manifest(tiny_bundle) -> dict:
    manifest = copy.deepcopy(read_manifest(tiny_bundle))
    as_cuda_sm90(manifest)
    return manifest


@pytest.mark.parametrize("gpus, workers, expected_workers, share", [
    (1, None, 1, 1.0), (2, None, 2, 1.0), (4, 1, 1, 1.0), (2, 3, 3, 0.5), (2, 5, 5, 0.3333), (1, 4, 4, 0.25),
    (3.5, None, 3, 1.0)])
def test_a_cuda_bundle_takes_a_worker_per_free_gpu_or_even_shares(cuda_manifest, gpus, workers, expected_workers,
                                                                   share):
    layout = WorkerLayout.fit(Cluster(cpus=16, gpus=gpus), cuda_manifest, workers, None)
    assert (layout.workers, layout.threads, layout.gpus) == (expected_workers, 1, share)
    assert worker_options(layout)["num_gpus"] == share
    whole = int(gpus)
    per_gpu = -(-layout.workers // whole)  # Ray places them so: each share fits on one GPU beside the others
    assert per_gpu * round(share * GPU_SHARES) <= GPU_SHARES and per_gpu * whole >= layout.workers


def test_a_cpu_bundle_asks_for_cpus_only(tiny_bundle):
    layout = WorkerLayout.fit(Cluster(cpus=5, gpus=2), read_manifest(tiny_bundle), None, 2)
    assert layout == WorkerLayout(workers=2, threads=2, gpus=0.0)
    assert worker_options(layout) == {"num_cpus": 2, "runtime_env": {"env_vars": {"TVM_NUM_THREADS": "2"}}}


@pytest.mark.parametrize("cluster, workers, says", [
    (Cluster(cpus=16, gpus=0), None, r"cuda-sm90 and runs on an NVIDIA GPU, but the Ray cluster has no free GPU "
                                     r"\(0 in all\)"),
    (Cluster(cpus=16, gpus=0.5, total_gpus=1), 1, r"no free GPU \(1 in all\)"),
    (Cluster(cpus=2, gpus=4), None, r"4 workers x 1 threads need 4 CPUs, but the Ray cluster has 2"),
    (Cluster(cpus=16, gpus=1), 0, "workers must be at least 1"),
])
def test_a_cuda_bundle_is_refused_where_the_cluster_cannot_place_it(cuda_manifest, cluster, workers, says):
    with pytest.raises(UserError, match=says):
        WorkerLayout.fit(cluster, cuda_manifest, workers, None)


@pytest.mark.parametrize("messages, expected", [
    (["Traceback (most recent call last):\n  File \"x.py\", line 1\nint8mt.runtime.cuda.GPUError: needs a GPU\n"],
     "needs a GPU"),
    (["Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: bad value"], "ValueError: bad value"),
    (["", "the actor died"], "the actor died"),
    ([], "Ray gave no reason; see the workers' logs (`ray logs`)"),
])
def test_worker_error_is_the_workers_own_message(messages, expected):
    assert worker_error(messages) == expected


ON_A_FAKE_GPU = """
import json, socket, sys, urllib.request
from pathlib import Path
import ray
from ray import serve
from int8mt.cli import main
from int8mt.serving.cluster import WorkerLayout
from int8mt.serving.server import APP_NAME, ServerSettings, start

cpu_bundle, cuda_bundle, source, port = sys.argv[1:5]
ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)  # a GPU Ray counts, none there
start(Path(cpu_bundle), WorkerLayout(workers=2, threads=1, gpus=0.5), ServerSettings(), "127.0.0.1", int(port))
request = urllib.request.Request(f"http://127.0.0.1:{port}/translate", data=b'{"text": ["A dog runs."]}')
with urllib.request.urlopen(request, timeout=120) as response:
    answer = json.loads(response.read())
gpu_while_serving = ray.available_resources().get("GPU", 0.0)
serve.delete(APP_NAME)
codes = [main(["serve", cuda_bundle, "--port", port]),
         main(["translate", cuda_bundle, "-i", source, "-o", source + ".de", "--ray"])]
serve.shutdown()
with socket.socket() as busy:  # (last: Serve keeps the proxy that failed)
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    codes.append(main(["serve", cpu_bundle, "--port", str(busy.getsockname()[1])]))
    print(json.dumps({"busy_port": busy.getsockname()[1]}))
print(json.dumps({"answer": answer, "gpu_while_serving": gpu_while_serving, "codes": codes}))
"""


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU here would load the edited bundle")
def test_workers_take_their_gpu_share_and_what_cannot_start_is_refused(tiny_bundle, tmp_path):
    cuda_bundle = tmp_path / "cuda-bundle"
    shutil.copytree(tiny_bundle, cuda_bundle)
    edit_manifest(cuda_bundle, as_cuda_sm90)
    source = tmp_path / "lines.en"
    source.write_text("A dog runs.\nTwo men talk.\n", encoding="utf-8")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = subprocess.run([sys.executable, "-c", ON_A_FAKE_GPU, str(tiny_bundle), str(cuda_bundle), str(source),
                          str(port)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    busy, result = (json.loads(line) for line in run.stdout.strip().splitlines()[-2:])
    address = f"127.0.0.1:{busy['busy_port']}"
    assert len(result["answer"]["translations"]) == 1
    assert result["gpu_while_serving"] == 0.0  # the two replicas hold half the GPU each
    assert result["codes"] == [2, 2, 2]
    errors = [line for line in run.stderr.splitlines() if ": error: " in line]
    assert errors[0].startswith("int8mt serve: error: the server's replicas failed to start: bundle was built for "
                                "target 'cuda-sm90', which " + GPU_MESSAGE), errors
    assert errors[1].startswith("int8mt translate: error: batch translation failed on the Ray cluster: bundle was "
                                "built for target 'cuda-sm90', which " + GPU_MESSAGE), errors
    assert errors[2].startswith(f"int8mt serve: error: Ray Serve's HTTP proxy cannot listen on {address} "
                                f"(RuntimeError: Failed to bind to address '{address}'.): is another server "
                                "using the port"), errors
    assert "experimental" not in run.stderr  # (Ray Data's word for a worker that asks for CPUs and GPUs)
    assert "open an issue" not in run.stderr  # Ray Data's report of the failure as a bug of its own
