"""Issue 12's lean chain: the per-request work that was cut, and that nothing was lost with it.

What each request still gets (request id, access line, metrics, security headers, rate
limit) is tested where it always was (test_middlewares, test_metrics, test_limiter);
these tests pin down the cheaper way it is now done.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import os
import signal
import uuid

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from middlewares.request_id import fresh_request_id
from server.app import create_app
from server.keys import front_door_key
from server.ops.logs import AccessLog
from server.ops.metrics import Metrics, forget_process


class CountingStream(io.BytesIO):
    """A real stream that also counts its writes (each one is a system call on stderr)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data) -> int:
        self.writes += 1
        return super().write(data)


def test_the_front_door_is_the_apps_request_handler_with_no_middleware_chain_or_signal(settings):
    app = create_app(settings)  # no CORS origins: aiohttp-cors adds nothing
    assert list(app.middlewares) == []  # nothing for aiohttp's middleware machinery to run
    assert list(app.on_response_prepare) == []  # headers come from HeraldRequest._prepare_hook
    assert app._handle.func == app[front_door_key].handle
    # The aiohttp internals the front door stands on (an upgrade that moves them fails here).
    assert inspect.signature(web.Application._make_request).parameters["_cls"].default is web.Request
    assert inspect.iscoroutinefunction(web.Request._prepare_hook)
    assert "request_factory=self._make_request" in inspect.getsource(web.Application._make_handler)


async def test_a_request_reaches_its_handler_through_one_herald_frame(aiohttp_client, settings):
    """Between aiohttp's connection handler and the route's handler: the front door's two
    calls (route, then serve) and nothing of aiohttp's middleware machinery."""
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        frames = [f.function for f in inspect.stack(0)]
        seen.extend(frames[1 : frames.index("_handle_request")])
        return web.Response(text="ok")

    app = create_app(settings)
    app.router.add_get("/t/frames", handler)
    client = await aiohttp_client(app)
    resp = await client.get("/t/frames")
    assert resp.status == 200
    assert resp.headers["X-Content-Type-Options"] == "nosniff"  # the headers still came
    assert "X-Request-Id" in resp.headers
    assert seen == ["serve", "handle"], seen


async def test_the_access_lines_of_one_loop_turn_go_out_in_one_write():
    stream = CountingStream()
    log = AccessLog(stream)
    for n in range(5):
        log.write({"n": n})
    assert stream.writes == 0  # not yet: at the loop's next turn
    await asyncio.sleep(0)  # one turn: the flush was scheduled before this task's wake-up
    assert stream.writes == 1
    assert [line for line in stream.getvalue().split(b"\n") if line].__len__() == 5
    log.write({"n": 5})
    log.flush()  # what the app's cleanup does when the worker stops
    assert stream.writes == 2
    assert stream.getvalue().count(b"\n") == 6


def test_fresh_request_ids_are_random_uuids_and_a_forked_worker_draws_its_own():
    ids = [fresh_request_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for text in ids[:300]:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: as a worker forked by the supervisor would
        os.write(write, fresh_request_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    from_child = os.read(read, 64).decode()
    os.close(read)
    assert from_child != fresh_request_id()  # the parent's next id was not handed to the child too


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_killed_processs_counts_stay_and_its_gauges_go(tmp_path):
    directory = str(tmp_path)
    pid = os.fork()
    if pid == 0:  # a worker: counts, then dies without any exit path running
        try:
            metrics = Metrics(directory=directory)
            for _ in range(3):
                metrics.observe_request("GET", "/healthz", 200, 0.001)
            metrics.observe_request("BREW", "/healthz", 418, 20.0)  # an unknown method counts as OTHER
            metrics.published.inc(7)
            metrics.connections.labels("ws").set(2)
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)

    scraper = Metrics(directory=directory)
    scraper.observe_request("GET", "/healthz", 200, 0.02)
    scraper.connections.labels("ws").set(1)
    found = samples(scraper.render().decode())
    route = ("route", "/healthz")
    assert found["herald_http_requests_total", (("method", "GET"), route, ("status", "200"))] == 4
    assert found["herald_http_requests_total", (("method", "OTHER"), route, ("status", "418"))] == 1
    assert found["herald_events_published_total", ()] == 7
    assert found["herald_connections", (("transport", "ws"),)] == 3  # the dead one's still counts...
    assert found["herald_http_request_duration_seconds_count", ()] == 5
    assert found["herald_http_request_duration_seconds_bucket", (("le", "0.005"),)] == 3
    assert found["herald_http_request_duration_seconds_bucket", (("le", "0.025"),)] == 4
    assert found["herald_http_request_duration_seconds_bucket", (("le", "+Inf"),)] == 5
    assert abs(found["herald_http_request_duration_seconds_sum", ()] - 20.023) < 1e-9

    forget_process(pid, directory)  # ...until the supervisor has reaped it
    found = samples(scraper.render().decode())
    assert found["herald_connections", (("transport", "ws"),)] == 1
    assert found["herald_http_requests_total", (("method", "GET"), route, ("status", "200"))] == 4
    scraper.store.close()
