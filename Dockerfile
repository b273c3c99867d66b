# syntax=docker/dockerfile:1
# Multi-stage: the builder compiles the Cython core into a wheel; the runtime
# image has no compiler and runs as an unprivileged user.
FROM python:3.11-slim AS builder
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY fastgate ./fastgate
# '.[cluster]': the image also runs as a cluster node ([cluster] store = "postgresql://...").
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[cluster]'

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/fastgate --create-home fastgate
COPY --from=builder /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER fastgate
WORKDIR /var/lib/fastgate
# Client traffic on 8080. The admin API stays on loopback inside the container
# unless an operator publishes it on purpose (--admin-listen 0.0.0.0:9901).
EXPOSE 8080
STOPSIGNAL SIGTERM
# Liveness from inside the container, on the loopback admin port (no token needed).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2)"
ENTRYPOINT ["fastgate"]
# Mount a config at /etc/fastgate/gateway.toml and run:
#   docker run ... fastgate run --config /etc/fastgate/gateway.toml --listen 0.0.0.0:8080
CMD ["run", "--listen", "0.0.0.0:8080", "--data-dir", "/var/lib/fastgate/data"]
