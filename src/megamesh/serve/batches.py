"""The Message Batches API (/v1/messages/batches): create, retrieve, list, cancel, delete
and results (JSONL), as the Messages API defines them, kept in SQLite.

A batch's requests are stored when it is created and processed in the background: a
worker task on the server's event loop submits pending requests to the engine at its
lower priority (interactive requests are admitted first and preempt batch work; see
`serve.engine`), at most `concurrency` at a time, and writes each result to the database
the moment it is done (one transaction each). Nothing is held only in memory: a server
killed mid-batch and started again on the same database goes on with the requests that
had no result (a request in flight at the kill is run again), and every result written
before is kept. SQLite in WAL mode with synchronous=NORMAL: a committed result survives
the process dying (a power cut may lose the last few).

Per request, as the Messages API does: `params` are validated when the request is
processed (an invalid one gets an `errored` result, the batch goes on); results are
`succeeded` (the message), `errored`, `canceled` (the batch was canceled first) or
`expired` (not processed within 24 hours).
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from megamesh.errors import ConfigError
from megamesh.serve.anthropic import MessagesRequest, message_object, prompt_of
from megamesh.serve.core import ApiError, Core, clip

EXPIRY_S = 24 * 3600  # the Messages API's: results of requests not processed by then: expired
MAX_REQUESTS = 100_000  # per batch, as the Messages API
CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL, api_key TEXT NOT NULL,
    created_at REAL NOT NULL, expires_at REAL NOT NULL, cancel_initiated_at REAL,
    ended_at REAL, status TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    batch_id TEXT NOT NULL, idx INTEGER NOT NULL, custom_id TEXT NOT NULL, params TEXT NOT NULL,
    state TEXT NOT NULL, result TEXT, PRIMARY KEY (batch_id, idx));
CREATE INDEX IF NOT EXISTS pending ON requests (state, batch_id, idx);
"""


def _time(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


class BatchStore:
    """The batches and their requests in one SQLite database (`path`; ":memory:" keeps
    them for the life of the process only)."""

    def __init__(self, path: str | Path):
        try:
            if str(path) != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as e:
            raise ConfigError(f"--batch-db {path}: cannot use it as the Message Batches database "
                              f"({e})") from None

    def create(self, api_key: str, items: list[tuple[str, str]]) -> str:
        bid = "msgbatch_" + secrets.token_hex(12)
        now = time.time()
        with self.db:
            self.db.execute("BEGIN")
            seq = self.db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM batches").fetchone()[0]
            self.db.execute("INSERT INTO batches VALUES (?, ?, ?, ?, ?, NULL, NULL, 'in_progress')",
                            (bid, seq, api_key, now, now + EXPIRY_S))
            self.db.executemany("INSERT INTO requests VALUES (?, ?, ?, ?, 'pending', NULL)",
                                [(bid, i, cid, params) for i, (cid, params) in enumerate(items)])
        return bid

    def get(self, bid: str) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM batches WHERE id = ?", (bid,)).fetchone()

    def counts(self, bid: str) -> dict[str, int]:
        out = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        for state, n in self.db.execute("SELECT state, COUNT(*) FROM requests WHERE batch_id = ? "
                                        "GROUP BY state", (bid,)):
            out["processing" if state == "pending" else state] += n
        return out

    def page(self, api_key: str, limit: int, before: str | None, after: str | None) -> list[sqlite3.Row]:
        """Batches newest first; `after`: older than that id, `before`: newer than it."""
        sql, args = "SELECT * FROM batches WHERE api_key = ?", [api_key]
        if after:
            sql += " AND seq < (SELECT seq FROM batches WHERE id = ?)"
            args.append(after)
        if before:
            sql += " AND seq > (SELECT seq FROM batches WHERE id = ?)"
            args.append(before)
        order = "ASC" if before and not after else "DESC"
        rows = self.db.execute(f"{sql} ORDER BY seq {order} LIMIT ?", (*args, limit + 1)).fetchall()
        return sorted(rows, key=lambda r: -r["seq"]) if order == "ASC" else rows

    def pending(self, limit: int, skip: set[tuple[str, int]]) -> list[sqlite3.Row]:
        """Requests to process, oldest batch first, not those in `skip` (in flight)."""
        rows = self.db.execute(
            "SELECT r.batch_id, r.idx, r.custom_id, r.params, b.api_key FROM requests r JOIN batches b "
            "ON b.id = r.batch_id WHERE r.state = 'pending' AND b.status = 'in_progress' "
            "ORDER BY b.seq, r.idx LIMIT ?", (limit + len(skip),)).fetchall()
        return [r for r in rows if (r["batch_id"], r["idx"]) not in skip][:limit]

    def done(self, bid: str, idx: int, state: str, result: dict[str, Any]) -> None:
        with self.db:
            self.db.execute("UPDATE requests SET state = ?, result = ? WHERE batch_id = ? AND idx = ? "
                            "AND state = 'pending'", (state, json.dumps(result), bid, idx))

    def cancel(self, bid: str) -> None:
        with self.db:
            self.db.execute("UPDATE batches SET status = 'canceling', cancel_initiated_at = ? "
                            "WHERE id = ? AND status = 'in_progress'", (time.time(), bid))

    def settle(self, in_flight: set[tuple[str, int]]) -> None:
        """Expire what is past its time, cancel what is canceled, and end batches with
        nothing left to do."""
        now = time.time()
        with self.db:
            for state, status, cond in (("expired", "in_progress", "b.expires_at <= ?"),
                                        ("canceled", "canceling", "? IS NOT NULL")):
                rows = self.db.execute(
                    f"SELECT r.batch_id, r.idx FROM requests r JOIN batches b ON b.id = r.batch_id "
                    f"WHERE r.state = 'pending' AND b.status = ? AND {cond}", (status, now)).fetchall()
                for r in rows:
                    if (r["batch_id"], r["idx"]) not in in_flight:
                        self.db.execute("UPDATE requests SET state = ?, result = ? WHERE batch_id = ? "
                                        "AND idx = ?", (state, json.dumps({"type": state}),
                                                        r["batch_id"], r["idx"]))
            busy = {bid for bid, _ in in_flight}
            for row in self.db.execute("SELECT id FROM batches WHERE status != 'ended'").fetchall():
                left = self.db.execute("SELECT 1 FROM requests WHERE batch_id = ? AND state = 'pending' "
                                       "LIMIT 1", (row["id"],)).fetchone()
                if left is None and row["id"] not in busy:
                    self.db.execute("UPDATE batches SET status = 'ended', ended_at = ? WHERE id = ?",
                                    (now, row["id"]))

    def results(self, bid: str):
        for row in self.db.execute("SELECT custom_id, result FROM requests WHERE batch_id = ? "
                                   "ORDER BY idx", (bid,)):
            yield json.dumps({"custom_id": row["custom_id"], "result": json.loads(row["result"])}) + "\n"

    def delete(self, bid: str) -> None:
        with self.db:
            self.db.execute("DELETE FROM requests WHERE batch_id = ?", (bid,))
            self.db.execute("DELETE FROM batches WHERE id = ?", (bid,))


class Interrupted(Exception):
    """A batch request ended by the server's shutdown: not a result."""


class Worker:
    """Processes pending batch requests in the background (an asyncio task)."""

    def __init__(self, core: Core, store: BatchStore, concurrency: int):
        self.core, self.store, self.concurrency = core, store, max(1, concurrency)
        self.in_flight: dict[tuple[str, int], Any] = {}  # -> the Generation, once started
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass

    async def run(self) -> None:
        while True:
            for key, gen in list(self.in_flight.items()):  # a canceled batch's requests stop
                row = self.store.get(key[0])
                if gen is not None and (row is None or row["status"] == "canceling"):
                    self.core.engine.cancel(gen.handle)
            self.store.settle(set(self.in_flight))
            free = 0 if self.core.draining else self.concurrency - len(self.in_flight)
            # only as much as the engine's queue takes without refusing interactive traffic
            room = max(0, self.core.engine.max_queue // 2 - self.core.engine.waiting)
            for row in self.store.pending(min(free, room), set(self.in_flight)) if free > 0 else []:
                key = (row["batch_id"], row["idx"])
                self.in_flight[key] = None
                asyncio.get_running_loop().create_task(self.one(key, row["params"], row["api_key"]))
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=0.25)
            except TimeoutError:
                pass

    async def one(self, key: tuple[str, int], params: str, api_key: str) -> None:
        state, result = "errored", None
        try:
            state, result = await self.generate(key, params, api_key)
        except Interrupted:
            pass  # the server is shutting down: the request stays pending, to run after a restart
        except ApiError as e:
            if e.status == 503 and self.core.draining:
                return  # refused for the shutdown: pending, as above
            kind = {400: "invalid_request_error", 404: "not_found_error", 529: "overloaded_error"}
            result = {"type": "errored", "error": {"type": "error", "error": {
                "type": kind.get(e.status, "api_error"), "message": e.message}}}
        except Exception as e:  # noqa: BLE001 -- one request's failure is its result only
            self.core.engine.log(f"batch request {key} failed: {type(e).__name__}: {e}")
            result = {"type": "errored", "error": {"type": "error", "error": {
                "type": "api_error", "message": "internal server error"}}}
        finally:
            if result is not None:
                self.store.done(*key, state, result)
            self.in_flight.pop(key, None)
            self.wake.set()

    async def generate(self, key: tuple[str, int], params: str, api_key: str) -> tuple[str, dict]:
        try:
            req = Core.validate(MessagesRequest, json.loads(params))
        except ApiError as e:
            raise ApiError(400, f"params.{e.message}") from None
        if req.stream:
            raise ApiError(400, "params.stream: batch requests are not streamed")
        self.core.check_model(req.model)
        sampling = req.sampling()
        gen = self.core.start(await prompt_of(self.core, req), sampling, api_key,
                              background=True, fit_window=True, tools=req.callable_tools)
        self.in_flight[key] = gen
        text = []
        try:
            async for ev in gen.events():
                text.append(ev.text)
        finally:
            self.core.finish(gen)
        if ev.stop_reason == "cancelled" and gen.aborted:
            raise Interrupted()
        if ev.stop_reason == "cancelled":
            return "canceled", {"type": "canceled"}
        if ev.stop_reason == "error":
            raise ApiError(500, "generation failed")
        return "succeeded", {"type": "succeeded",
                             "message": message_object(self.core, gen, "".join(text), ev,
                                                        bool(req.callable_tools), req.model)}


def register(app: FastAPI, core: Core, store: BatchStore, concurrency: int) -> Worker:
    worker = Worker(core, store, concurrency)
    app.router.on_startup.append(worker.start)
    app.router.on_shutdown.append(worker.stop)

    def batch_object(request: Request, row: sqlite3.Row) -> dict[str, Any]:
        ended = row["status"] == "ended"
        base = str(request.base_url).rstrip("/")
        return {"id": row["id"], "type": "message_batch", "processing_status": row["status"],
                "request_counts": store.counts(row["id"]), "ended_at": _time(row["ended_at"]),
                "created_at": _time(row["created_at"]), "expires_at": _time(row["expires_at"]),
                "archived_at": None, "cancel_initiated_at": _time(row["cancel_initiated_at"]),
                "results_url": f"{base}/v1/messages/batches/{row['id']}/results" if ended else None}

    def owned(request: Request, bid: str) -> sqlite3.Row:
        key = core.authorize(request)
        row = store.get(bid)
        if row is None or row["api_key"] != key:
            raise ApiError(404, f"message batch {clip(bid)} was not found")
        return row

    @app.post("/v1/messages/batches")
    async def create(request: Request) -> Response:
        key = core.authorize(request)
        core.refuse_if_draining()
        body = await core.read_json(request)
        if not isinstance(body, dict) or set(body) != {"requests"} or not isinstance(body["requests"], list):
            raise ApiError(400, "the body must be {\"requests\": [{\"custom_id\", \"params\"}, ...]}")
        reqs = body["requests"]
        if not 1 <= len(reqs) <= MAX_REQUESTS:
            raise ApiError(400, f"requests: {len(reqs)} requests; a batch has 1 to {MAX_REQUESTS:,}")
        items, seen = [], set()
        for i, r in enumerate(reqs):
            if not isinstance(r, dict) or set(r) != {"custom_id", "params"}:
                raise ApiError(400, f"requests.{i}: must be an object with custom_id and params")
            cid = r["custom_id"]
            if not isinstance(cid, str) or not CUSTOM_ID.match(cid):
                raise ApiError(400, f"requests.{i}.custom_id: 1 to 64 letters, digits, _ or -")
            if cid in seen:
                raise ApiError(400, f"requests.{i}.custom_id: {clip(cid)} is used twice in this batch")
            if not isinstance(r["params"], dict):
                raise ApiError(400, f"requests.{i}.params: must be an object (a Messages request)")
            seen.add(cid)
            items.append((cid, json.dumps(r["params"])))
        bid = store.create(key, items)
        worker.wake.set()
        return JSONResponse(batch_object(request, store.get(bid)))

    @app.get("/v1/messages/batches")
    async def list_batches(request: Request, limit: int = 20, before_id: str | None = None,
                           after_id: str | None = None) -> Response:
        key = core.authorize(request)
        if not 1 <= limit <= 1000:
            raise ApiError(400, f"limit: {limit} is not allowed: 1 to 1000")
        rows = store.page(key, limit, before_id, after_id)
        more, rows = len(rows) > limit, rows[:limit]
        data = [batch_object(request, r) for r in rows]
        return JSONResponse({"data": data, "has_more": more,
                             "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None})

    @app.get("/v1/messages/batches/{bid}")
    async def retrieve(request: Request, bid: str) -> Response:
        return JSONResponse(batch_object(request, owned(request, bid)))

    @app.post("/v1/messages/batches/{bid}/cancel")
    async def cancel(request: Request, bid: str) -> Response:
        owned(request, bid)
        store.cancel(bid)
        worker.wake.set()
        return JSONResponse(batch_object(request, store.get(bid)))

    @app.get("/v1/messages/batches/{bid}/results")
    async def results(request: Request, bid: str) -> Response:
        row = owned(request, bid)
        if row["status"] != "ended":
            raise ApiError(400, f"message batch {bid} is still {row['status']}: its results are "
                                "available once processing has ended")
        return StreamingResponse(store.results(bid), media_type="application/x-jsonl")

    @app.delete("/v1/messages/batches/{bid}")
    async def delete(request: Request, bid: str) -> Response:
        row = owned(request, bid)
        if row["status"] != "ended":
            raise ApiError(400, f"message batch {bid} is still {row['status']}: cancel it and wait "
                                "for it to end before deleting it")
        store.delete(bid)
        return JSONResponse({"id": bid, "type": "message_batch_deleted"})

    return worker
