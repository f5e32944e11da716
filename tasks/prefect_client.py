"""The one Prefect client a command uses, which asks again at once what a busy Prefect server refused.

A Prefect server on SQLite answers 503 when a write meets another one ("database is locked": SQLite refuses at
once a transaction that read before the other one wrote). Prefect's client then waits 2 s, then 4 s
(prefect 3.8 `_send_with_retry`), also to create a flow run or set its state; the lock is gone in
milliseconds. This client's transport asks again after 5, 10, 20, 40, 50 and 50 ms first (`busy_pause`; a
502 or 504 from a proxy in front of the server too), and what is still refused goes on to Prefect's own
retries, as before. A 503 that says when to come back (Retry-After) is Prefect's to honour. Slot requests use
the same transport with more patience (`tasks.limits._fast_client`).

Private API, prefect 3.8.x (the version pyproject.toml pins): `SyncClientContext._httpx_settings`. Prefect's
`get_client()` hands out a context's client only when it is asked with the settings the context was made
with, and the flow engine asks with none; so the context, made with this transport, is recorded as made
with none. Nothing else reads that attribute.
"""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import Iterator, Sequence
from typing import Any

import certifi
import httpx
from prefect.context import SyncClientContext
from prefect.settings import PREFECT_API_ENABLE_HTTP2, PREFECT_API_SSL_CERT_FILE, PREFECT_API_TLS_INSECURE_SKIP_VERIFY


def busy_pause(refusals: int) -> float:
    """How long to wait before asking a Prefect server that refused a request `refusals` times in a row (503,
    "database is locked") again: 5 ms, doubling, at most 50 ms. SQLite refuses at once a write that meets
    another one, and the other one is over in milliseconds: a first pause of 50 ms was most of the 60 ms a
    refused slot request cost (bench trace, c=10), against 25 ms now."""
    return min(0.05, 0.005 * 2 ** (refusals - 1))


AGAIN_AFTER_S = tuple(busy_pause(n) for n in range(1, 7))
BUSY = (502, 503, 504)


class QuickRetryTransport(httpx.HTTPTransport):
    """An HTTP transport that sends a request again, after each pause of `again_after`, while the server
    answers 502, 503 or 504 without Retry-After; the last answer is returned, whatever it is."""

    def __init__(self, *args: Any, again_after: Sequence[float] = AGAIN_AFTER_S, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.again_after = again_after

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for pause in self.again_after:
            response = super().handle_request(request)
            if response.status_code not in BUSY or "retry-after" in response.headers:
                return response
            response.read()
            response.close()
            time.sleep(pause)
        return super().handle_request(request)


def quick_retry_settings(again_after: Sequence[float] = AGAIN_AFTER_S) -> dict[str, Any]:
    """httpx settings for a Prefect client whose requests a busy server refused are asked again after
    `again_after`: the transport, with the TLS, pool and HTTP/2 settings Prefect gives its own."""
    tls = ssl_context()
    transport = QuickRetryTransport(
        verify=tls,
        retries=3,  # connection attempts, as Prefect sets on its own transport
        # Prefect's own connection pool settings for its client (prefect 3.8 SyncPrefectClient)
        limits=httpx.Limits(max_connections=16, max_keepalive_connections=8, keepalive_expiry=25),
        http2=PREFECT_API_ENABLE_HTTP2.value(),
        again_after=again_after,
    )
    return {"transport": transport, "verify": tls}


def ssl_context() -> ssl.SSLContext:
    """The TLS context Prefect's client makes from the settings (PREFECT_API_TLS_INSECURE_SKIP_VERIFY,
    PREFECT_API_SSL_CERT_FILE, else certifi's CAs): a transport of one's own must carry it."""
    if PREFECT_API_TLS_INSECURE_SKIP_VERIFY.value():
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=PREFECT_API_SSL_CERT_FILE.value() or certifi.where())


@contextlib.contextmanager
def command_client() -> Iterator[SyncClientContext]:
    """The Prefect client of everything this thread (and the threads that copy its context) asks Prefect
    inside the block: flow runs, blocks, artifacts. An enclosing one is used as it is."""
    existing = SyncClientContext.get()
    if existing is not None:
        yield existing
        return
    context = SyncClientContext(httpx_settings=quick_retry_settings())
    context._httpx_settings = None  # see the module's docstring
    with context:
        yield context
