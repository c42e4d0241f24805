"""Durations of the gRPC requests the daemon answers, by method and status code.

A server interceptor times each unary and server-streaming call. The method names form a fixed
set (containerd's snapshots API and lazysnap's daemon API), and so do the status codes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from fusefs import Histogram

# Seconds: a Stat answers in microseconds, a lazy Prepare waits on a registry for seconds.
SECOND_BOUNDS = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                 30.0)


class GrpcStats:
    """Histograms per (method, code); gRPC's worker threads record, a scrape copies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._durations: dict[tuple[str, str], Histogram] = {}

    def observe(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        key = (method, code.name)
        with self._lock:
            histogram = self._durations.get(key)
            if histogram is None:
                histogram = self._durations[key] = Histogram(SECOND_BOUNDS)
            histogram.observe(seconds)

    def snapshot(self) -> dict[tuple[str, str], Histogram]:
        with self._lock:
            return {key: histogram.copy() for key, histogram in self._durations.items()}


def _code(context: grpc.ServicerContext, failed: bool) -> grpc.StatusCode:
    code = getattr(context, "code", lambda: None)()  # set by abort() or set_code()
    if isinstance(code, grpc.StatusCode):
        return code
    return grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK


if TYPE_CHECKING:
    _Interceptor = grpc.ServerInterceptor[Any, Any]
else:  # generic only in the type stubs
    _Interceptor = grpc.ServerInterceptor


class MetricsInterceptor(_Interceptor):
    """Times every unary and server-streaming RPC into ``stats``."""

    def __init__(self, stats: GrpcStats) -> None:
        self._stats = stats

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _unary(self, method: str, behavior: Callable[[Any, grpc.ServicerContext], Any]
               ) -> Callable[[Any, grpc.ServicerContext], Any]:
        def timed(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            failed = True
            try:
                answer = behavior(request, context)
                failed = False
                return answer
            finally:
                self._stats.observe(method, _code(context, failed), time.perf_counter() - started)

        return timed

    def _streaming(self, method: str,
                   behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]]
                   ) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
        def timed(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            started = time.perf_counter()
            failed = True
            try:
                yield from behavior(request, context)
                failed = False
            finally:
                self._stats.observe(method, _code(context, failed), time.perf_counter() - started)

        return timed
