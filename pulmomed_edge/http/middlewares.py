"""Errors become Spanish JSON bodies; nothing reaches a headset as an HTML 500 page."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(
    status: int, error: str, *, headers: dict[str, str] | None = None, **extra: Any
) -> web.Response:
    return web.json_response({"error": error, **extra}, status=status, headers=headers, dumps=dumps)


def dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False)


MESSAGES = {
    404: "Ruta no encontrada.",
    405: "Método no permitido en esta ruta.",
    413: "El cuerpo de la solicitud es demasiado grande (máximo 64 KiB).",
}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        message = MESSAGES.get(exc.status, exc.reason)
        return json_error(exc.status, message, headers={k: v for k, v in exc.headers.items() if k == "Allow"})
    except ConnectionResetError:
        raise  # the client left (mid-body or mid-stream): aiohttp closes quietly, no error to log
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return json_error(500, "Error interno del servidor. El equipo técnico puede revisar el registro.")


class MalformedHttpFilter(logging.Filter):
    """aiohttp answers a request it cannot parse (bad framing, an unknown method, a line too long)
    with its own 400 before any handler runs, and logs a traceback at ERROR: a client's mistake,
    not ours. Keep one WARNING line for it so the teacher's log shows real errors.

    A body that cannot be decoded (a Content-Encoding it does not match) reaches the handler, which
    answers 400 and logs one WARNING line naming the client; aiohttp then reads what is left of the
    body before closing (its lingering close), meets the same error and logs it as an ERROR
    "Unhandled exception" with a traceback, which is dropped (aiohttp offers no way to skip that
    read for one request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, web.RequestPayloadError):
            return False
        if isinstance(exc, HttpProcessingError):
            record.msg = f"{record.getMessage()}: malformed HTTP ({exc.message})"
            record.args = ()
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class RateLimiter:
    """Per-headset sliding window: at most `per_minute` teacher requests per client IP (0 = off)."""

    def __init__(self, per_minute: int, clock: Callable[[], float]) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._seen: dict[str, list[float]] = {}

    def check(self, client: str) -> float:
        """0 when allowed (and counted), else the seconds until the next request is allowed."""
        if self.per_minute <= 0:
            return 0.0
        now = self._clock()
        window = [t for t in self._seen.get(client, []) if now - t < 60.0]
        if len(window) >= self.per_minute:
            self._seen[client] = window
            return 60.0 - (now - window[0])
        window.append(now)
        self._seen[client] = window
        if len(self._seen) > 4096:  # forget idle headsets so memory stays bounded
            self._seen = {k: v for k, v in self._seen.items() if v and now - v[-1] < 60.0}
        return 0.0
