# comfyfleet: `docker build -t comfyfleet .`, then run it with the settings of .env.example in
# its environment, e.g. `docker run --env-file .env -p 8000:8000 comfyfleet` with a .env made
# from it (docker-compose.yml shows a whole deployment). Migrations run at startup, once the
# database answers.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first: this layer is rebuilt only when requirements.txt changes.
COPY requirements.txt .
RUN pip install -r requirements.txt

# The sample workflows: served from /app/workflows (mount your own over it), and packaged
# (src/comfyfleet/sample_workflows links to them), so they are here before the install.
COPY workflows ./workflows
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-deps .

# The custom node package for the ComfyUI servers (Kubernetes copies it from this image into
# each ComfyUI pod, so the two sides are always the same version).
COPY comfyui_nodes ./comfyui_nodes

RUN useradd --system --uid 10001 --home-dir /app comfyfleet \
    && mkdir -p /app/.data && chown comfyfleet /app/.data
USER comfyfleet

ENV SERVICE_HOST=0.0.0.0 \
    SERVICE_PORT=8000 \
    WORKFLOWS_DIR=/app/workflows \
    DATA_DIR=/app/.data \
    LOG_FORMAT=json
EXPOSE 8000

# Through the container's own address, not 127.0.0.1: a service listening on loopback only
# (SERVICE_HOST=127.0.0.1) is out of everyone's reach and must not look healthy.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s \
    CMD ["python", "-c", "import os, socket, urllib.request; urllib.request.urlopen(f\"http://{socket.gethostname()}:{os.environ.get('SERVICE_PORT', '8000')}/healthz\", timeout=2)"]

# SIGTERM (docker stop) drains: no new claims, uploads and requests get SHUTDOWN_TIMEOUT.
# Give `docker stop -t` / stop_grace_period more than that.
CMD ["comfyfleet", "serve"]
