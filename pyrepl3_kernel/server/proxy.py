"""Proxying: on a server whose kernels run on a gateway (``--gateway-url``),
the pyrepl3 endpoints relay each request to the gateway's own
``/api/pyrepl3`` and stream its answer back."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

from jupyter_server.base.handlers import APIHandler
from tornado import web

#: How long a request forwarded to the gateway may take (the gateway bounds
#: each request itself: ``timeout``, ``wait``).
FORWARD_TIMEOUT = 86400.0 + 60


def forwarded(method: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """On a server whose kernels run on a gateway (``--gateway-url``), send
    the request on to the gateway's own ``/api/pyrepl3`` endpoint (with the
    GatewayClient's credentials) and relay its answer, streamed; otherwise
    run ``method``. Goes under ``@authorized``: this server's auth comes first."""

    @functools.wraps(method)
    async def wrapper(self: ForwardingHandler, *args: Any, **kwargs: Any) -> None:
        gateway = getattr(self.serverapp, "gateway_config", None)
        if gateway is not None and gateway.gateway_enabled:
            await self.forward(gateway)
        else:
            await method(self, *args, **kwargs)

    return wrapper


class ForwardingHandler(APIHandler):
    """An API handler that can relay its request to the gateway (see
    :func:`forwarded`)."""

    async def forward(self, gateway: Any) -> None:
        from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

        path = self.request.path[len(self.base_url.rstrip("/")) :]
        url = gateway.url.rstrip("/") + path
        if self.request.query:
            url += "?" + self.request.query
        options = dict(gateway.load_connection_args())
        headers = dict(options.pop("headers", None) or {})
        for name in ("Content-Type", "Accept"):
            if name in self.request.headers:
                headers[name] = self.request.headers[name]
        options.update(request_timeout=FORWARD_TIMEOUT, headers=headers)

        def on_header(line: str) -> None:
            if line.startswith("HTTP/"):
                self.set_status(int(line.split()[1]))
            elif ":" in line:
                name, value = (part.strip() for part in line.split(":", 1))
                if name.lower() in ("content-type", "cache-control", "x-accel-buffering"):
                    self.set_header(name, value)

        def on_chunk(chunk: bytes) -> None:
            self.write(chunk)
            # Relayed as it comes (server-sent events); a client gone away
            # shows here as a failed flush, which is of no consequence.
            self.flush().add_done_callback(lambda f: f.exception())

        request = HTTPRequest(
            url,
            method=self.request.method or "GET",
            body=self.request.body if self.request.method in ("POST", "PUT", "PATCH") else None,
            header_callback=on_header,
            streaming_callback=on_chunk,
            **options,
        )
        try:
            response = await AsyncHTTPClient().fetch(request, raise_error=False)
        except (HTTPClientError, OSError) as exc:
            raise web.HTTPError(502, f"the gateway {gateway.url} did not answer: {exc}") from None
        if response.code == 599:  # no HTTP answer (timeout, connection lost)
            raise web.HTTPError(502, f"the gateway {gateway.url} did not answer: {response.error}")
        self.finish()
