"""The HTTP API: the service's FastAPI apps (v1, and v2 under it) and their routes."""

from fastapi.telemetry import TelemetryConfig

# Both apps' FastAPI(telemetry=...): off. FastAPI's OpenTelemetry bridge looks up the global
# tracer, meter and logger providers at every request (10-14 us, a thirtieth of a submit's
# CPU) to find none configured; the service's own metrics are Prometheus's (GET /metrics).
NO_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}
