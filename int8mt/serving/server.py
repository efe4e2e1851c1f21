"""``int8mt serve``: a Ray Serve deployment that translates JSON requests with a bundle.

Each replica loads the bundle once. Sentences from concurrent requests are gathered with ``@serve.batch``
into one call of the runtime (which splits it further where sentences x beams exceed the bundle's row bound).

HTTP: ``POST /translate`` with ``{"text": "..." | ["...", ...], "beam": 4, "length_penalty": 0.6}`` (``beam``
and ``length_penalty`` optional) answers ``{"translations": [...]}``, one per input text; ``GET /health``
answers 200 with the bundle's name once the replica is ready. A malformed request is answered 400, one with
too many sentences, too long a sentence or too large a body 413, each with ``{"error": message}``.

In the cluster: ``serve.get_app_handle(APP_NAME).translate.remote(texts, beam=4)``.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from int8mt.errors import UserError
from int8mt.runtime.bundle import use_runtime_library
from int8mt.runtime.options import SearchOptions
from int8mt.runtime.translator import DEFAULT_BATCH_SIZE, Translator, check_decoding

from .cluster import WorkerLayout, pack_bundle, unpack_bundle, worker_error, worker_options

APP_NAME = "int8mt"
REQUEST_FIELDS = ("text", "beam", "length_penalty")


class RequestError(UserError):
    """A request the server refuses, with its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServerSettings:
    """What one replica does: its default search, how it batches, and the largest request it accepts."""

    options: SearchOptions = SearchOptions()
    max_batch: int = DEFAULT_BATCH_SIZE            # sentences gathered from requests into one runtime call
    batch_wait_ms: float = 5.0                     # how long a batch waits for more sentences once it has one
    max_request_sentences: int = 1024
    max_body_bytes: int = 1 << 20
    access_log: bool = False                       # a log line per request in the replicas' logs (costs CPU)
    target_lang: str | None = None                 # a multilingual model's target language (texts may name theirs)

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_request_sentences", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not math.isfinite(self.batch_wait_ms) or self.batch_wait_ms < 0:
            raise UserError(f"batch-wait-ms must be a finite number >= 0, got {self.batch_wait_ms}")


def parse_request(body: bytes, settings: ServerSettings) -> tuple[list[str], dict[str, Any]]:
    """The texts and search overrides of a ``/translate`` body; :class:`RequestError` names what is wrong."""
    if len(body) > settings.max_body_bytes:
        raise RequestError(413, f"request body has {len(body)} bytes; the server accepts at most "
                                f"{settings.max_body_bytes}")
    try:
        request = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise RequestError(400, "request body is not UTF-8") from None
    except json.JSONDecodeError as err:
        raise RequestError(400, f"request body is not JSON: {err}") from None
    if not isinstance(request, dict):
        raise RequestError(400, 'request body must be a JSON object such as {"text": ["A sentence."]}')
    unknown = sorted(set(request) - set(REQUEST_FIELDS))
    if unknown:
        raise RequestError(400, f"unknown fields {unknown}; a request has {', '.join(REQUEST_FIELDS)}")
    if "text" not in request:
        raise RequestError(400, 'request has no "text": give a string or a list of strings')
    texts = request["text"]
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise RequestError(400, '"text" must be a string or a list of strings')
    if len(texts) > settings.max_request_sentences:
        raise RequestError(413, f"request has {len(texts)} texts; the server takes at most "
                                f"{settings.max_request_sentences} per request: split it")
    overrides = {}
    if "beam" in request:
        if type(request["beam"]) is not int:
            raise RequestError(400, f'"beam" must be an integer, got {request["beam"]!r}')
        overrides["beam_size"] = request["beam"]
    if "length_penalty" in request:
        if type(request["length_penalty"]) not in (int, float):
            raise RequestError(400, f'"length_penalty" must be a number, got {request["length_penalty"]!r}')
        overrides["length_penalty"] = float(request["length_penalty"])
    return texts, overrides


@serve.deployment(name="Translator")
class TranslationServer:
    """One replica: the bundle's files (put in the object store by :func:`application`) unpacked on its node
    and loaded once."""

    def __init__(self, bundle_files: ray.ObjectRef, bundle_name: str, settings: ServerSettings) -> None:
        self.settings = settings
        use_runtime_library()
        self.translator = Translator(unpack_bundle(ray.get(bundle_files)), settings.options, settings.max_batch,
                                     settings.target_lang)
        manifest = self.translator.bundle.manifest
        self.health = {"status": "ready", "bundle": bundle_name, "target": manifest["target"]["preset"],
                       "max_rows": self.translator.bundle.max_rows}
        self._translate_batch.set_max_batch_size(settings.max_batch)
        self._translate_batch.set_batch_wait_timeout_s(settings.batch_wait_ms / 1000)

    async def __call__(self, request: Request) -> JSONResponse:
        routes = {"/translate": "POST", "/health": "GET"}
        path = request.url.path.rstrip("/") or "/"
        if path not in routes:
            return JSONResponse({"error": f"no route {path}; use POST /translate or GET /health"}, 404)
        if request.method != routes[path]:
            return JSONResponse({"error": f"{path} takes {routes[path]}, not {request.method}"}, 405)
        if path == "/health":
            return JSONResponse(self.health)
        try:
            declared = int(request.headers.get("content-length", "0"))
        except ValueError:
            declared = 0
        try:
            if declared > self.settings.max_body_bytes:  # refused before reading it
                raise RequestError(413, f"request body has {declared} bytes; the server accepts at most "
                                        f"{self.settings.max_body_bytes}")
            texts, overrides = parse_request(await request.body(), self.settings)
            return JSONResponse({"translations": await self._translate(texts, overrides)})
        except RequestError as err:
            return JSONResponse({"error": str(err)}, err.status)

    async def translate(self, text: str | list[str], beam: int | None = None,
                        length_penalty: float | None = None) -> list[str]:
        """The Python handle's entry point: one translation per text (a string counts as one text)."""
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise RequestError(400, "text must be a string or a list of strings")
        overrides = {k: v for k, v in (("beam_size", beam), ("length_penalty", length_penalty)) if v is not None}
        return await self._translate(texts, overrides)

    async def _translate(self, texts: list[str], overrides: dict[str, Any]) -> list[str]:
        options = self._options(overrides)
        limit = self.translator.bundle.max_positions
        for number, text in enumerate(texts, 1):
            try:
                tokens = len(self.translator.source_ids(text))
            except UserError as err:
                raise RequestError(400, f"text {number}: {err}") from None
            if tokens > limit:
                raise RequestError(413, f"text {number} has {tokens} tokens; the model reads at most {limit}: "
                                        "split it into shorter sentences")
        return list(await asyncio.gather(*(self._translate_batch((text, options)) for text in texts)))

    def _options(self, overrides: dict[str, Any]) -> SearchOptions:
        try:
            options = dataclasses.replace(self.settings.options, **overrides)
            check_decoding(options, self.settings.max_batch, self.translator.bundle.max_rows)
        except UserError as err:
            raise RequestError(400, str(err)) from None
        return options

    @serve.batch(max_batch_size=DEFAULT_BATCH_SIZE, batch_wait_timeout_s=0.005)
    async def _translate_batch(self, items: list[tuple[str, SearchOptions]]) -> list[str]:
        """Sentences gathered from concurrent requests: one runtime call per distinct search setting.

        The call runs on the replica's event loop and holds it: requests arriving meanwhile wait whole, then
        all reach the next batch. (Run in a thread instead, the search holds the GIL between TVM calls, so
        requests crawl into the batch queue one by one and batches stay small: see docs/serving.md.)"""
        return self._translate_grouped(items)

    def _translate_grouped(self, items: list[tuple[str, SearchOptions]]) -> list[str]:
        groups: dict[SearchOptions, list[int]] = defaultdict(list)
        for i, (_, options) in enumerate(items):
            groups[options].append(i)
        out = [""] * len(items)
        for options, rows in groups.items():
            for i, translation in zip(rows, self.translator.translate([items[i][0] for i in rows], options=options)):
                out[i] = translation
        return out


def application(bundle_dir: Path, layout: WorkerLayout, settings: ServerSettings) -> Any:
    """The Serve application: ``layout.workers`` replicas of ``layout.threads`` threads (and ``layout.gpus`` of a
    GPU) each. A replica takes as many requests at once as fill two batches; the proxy queues the rest."""
    return TranslationServer.options(
        num_replicas=layout.workers, max_ongoing_requests=2 * settings.max_batch,
        logging_config={"enable_access_log": settings.access_log},
        ray_actor_options=worker_options(layout),
    ).bind(ray.put(pack_bundle(bundle_dir)), bundle_dir.name, settings)


def start(bundle_dir: Path, layout: WorkerLayout, settings: ServerSettings, host: str, port: int) -> Any:
    """Deploy the application on the connected cluster with its HTTP proxy on ``host:port``; returns the
    application's handle once every replica is ready. Where the replicas fail to start (a GPU older than the
    bundle's, a node that cannot load it), the application is removed and the replicas' error raised as a
    :class:`UserError`, as is a proxy that cannot listen on ``host:port``."""
    try:
        serve.start(http_options={"host": host, "port": port})
    except ray.exceptions.RayError as err:
        raise UserError(f"Ray Serve's HTTP proxy cannot listen on {host}:{port} ({worker_error([str(err)])}): is "
                        "another server using the port, or is the host not an address of this machine? Choose "
                        "another --port or --host") from None
    try:
        return serve.run(application(bundle_dir, layout, settings), name=APP_NAME, route_prefix="/")
    except RuntimeError:
        status = serve.status().applications.get(APP_NAME)
        errors = [deployment.message for deployment in status.deployments.values()] if status else []
        serve.delete(APP_NAME)
        raise UserError(f"the server's replicas failed to start: {worker_error(errors)}") from None
