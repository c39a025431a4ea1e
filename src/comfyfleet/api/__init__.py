"""The HTTP API: the service's FastAPI apps (v1, and v2 under it) and their routes."""

import os

from fastapi.telemetry import TelemetryConfig


def telemetry() -> TelemetryConfig:
    """Both apps' FastAPI(telemetry=...): FastAPI's OpenTelemetry bridge, which looks up the
    global tracer, meter and logger providers at every request (10-14 us, a thirtieth of a
    submit's CPU), on only where the environment sets OpenTelemetry up (a variable named
    OTEL_... or FASTAPI_OTEL_...: `opentelemetry-instrument`'s, FastAPI's own auto-configure);
    off otherwise, with nothing to receive it (the service's metrics are Prometheus's)."""
    if any(name.startswith(("OTEL_", "FASTAPI_OTEL_")) for name in os.environ):
        return {}
    return {"tracing": False, "metrics": False, "logs": False}
