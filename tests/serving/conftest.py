"""One local Ray (this machine's CPUs; servers listen on 127.0.0.1) for the serving tests."""
import pytest


@pytest.fixture(scope="session")
def ray_local():
    from int8mt.serving.cluster import connect

    ray = connect(None)
    yield ray
    ray.shutdown()
