"""HTTP: the Anthropic Messages API and the OpenAI chat-completions API over one engine.

Routes: POST /v1/messages (plain and SSE streaming), POST /v1/messages/count_tokens
(`serve.anthropic`), the Message Batches routes under /v1/messages/batches
(`serve.batches`: SQLite, processed in the background at a lower priority),
POST /v1/chat/completions (plain and streaming; `serve.openai`),
GET /v1/models[/{id}], GET /health, GET /metrics (Prometheus; here). Both protocols stand
on one request core (`serve.core`: auth, limits, validation, admission, metrics, request
ids). What is supported: docs/serving.md.

Limits: a body-size cap (413), a per-key concurrency cap (429), the engine's bounded
queue (529 with retry-after) and the context (400). Clients that disconnect are
cancelled in the engine at once, freeing their slot.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from megamesh.serve import anthropic, batches, openai
from megamesh.serve.core import ApiError, Core, RequestIdMiddleware, Settings, clip, error_response
from megamesh.serve.engine import Engine

__all__ = ["ApiError", "Settings", "create_app"]


def create_app(engine: Engine, settings: Settings | None = None) -> FastAPI:
    core = Core(engine, settings or Settings())
    model = engine.model
    app = FastAPI(title="megamesh", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestIdMiddleware, metrics=core.metrics, log=engine.log)
    app.state.engine = engine
    app.state.core = core

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(request, e.status, e.message, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        path = clip(request.url.path, quote=False)
        msg = {404: f"{request.method} {path}: no such route",
               405: f"{request.method} is not allowed on {path}"}
        msg = msg.get(e.status_code, str(e.detail))
        return error_response(request, e.status_code, msg, e.headers)  # 405: its Allow

    # anything else a route raises becomes a 500 in RequestIdMiddleware (with its request-id)

    # ------------------------------------------------------------------ models, health, metrics

    def model_object(model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "type": "model", "display_name": model_id,
                "created": model.created,
                "created_at": datetime.fromtimestamp(model.created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "owned_by": "megamesh", "max_input_tokens": engine.max_len - 1,
                "max_tokens": engine.max_len - 1}

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        """The configured ids (the model's name and its --alias ids; with --any-model the
        server answers others too, which no list can show)."""
        core.authorize(request)
        ids = core.model_ids
        return JSONResponse({"object": "list", "data": [model_object(i) for i in ids],
                             "has_more": False, "first_id": ids[0], "last_id": ids[-1]})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(request: Request, model_id: str) -> Response:
        core.authorize(request)
        core.check_model(model_id)
        return JSONResponse(model_object(model_id))

    @app.get("/health")
    async def health() -> Response:
        """Readiness: 200 while this server takes requests, 503 from the moment it starts
        shutting down (load balancers stop sending it traffic) or fails (a host of a
        multi-host server is gone: `error` says which)."""
        if core.failed:
            return JSONResponse({"status": "failed", "error": core.failed}, status_code=503)
        return JSONResponse({"status": "draining" if core.draining else "ok", "model": model.name,
                             "slots": engine.slots, "active_slots": engine.active,
                             "queue_depth": engine.waiting, "max_len": engine.max_len,
                             # smaller decode batches still compiling in the background
                             "compiling": not engine.compiled_all.is_set()},
                            status_code=503 if core.draining else 200)

    @app.get("/health/live")
    async def live() -> Response:
        """Liveness: 200 while the process serves HTTP at all, draining included (a
        liveness probe on /health would restart a draining server); 503 once it has failed."""
        if core.failed:
            return JSONResponse({"status": "failed", "error": core.failed}, status_code=503)
        return JSONResponse({"status": "draining" if core.draining else "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(core.metrics.registry), media_type="text/plain; version=0.0.4")

    anthropic.register(app, core)
    openai.register(app, core)
    store = batches.BatchStore(core.settings.batch_db or ":memory:")
    app.state.batches = batches.register(app, core, store, core.settings.batch_concurrency
                                         or engine.slots)
    return app
