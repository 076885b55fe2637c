# syntax=docker/dockerfile:1
#
# calcinosis-cds: one image, several roles. The entrypoint is the `calcinosis-cds` CLI, so
#   docker run IMAGE                          -> API (serve on 0.0.0.0:8080)
#   docker run IMAGE worker --queues ingest   -> Celery worker
#   docker run IMAGE beat                     -> Celery beat
#   docker run IMAGE migrate                  -> alembic upgrade head
#
# Base image: pinned to an exact patch release and Debian suite. To pin the digest as well (recommended
# for production builds), resolve it once and append it to the tag:
#   docker buildx imagetools inspect python:3.11.10-slim-bookworm     # prints "Digest: sha256:..."
#   docker build --build-arg PYTHON_IMAGE=python:3.11.10-slim-bookworm@sha256:<digest> .
# Renovate/Dependabot can keep the tag and digest current.
#
# Runtime contract (read-only root filesystem friendly):
#   - runs as uid/gid 10001, never root;
#   - writes only to /tmp (tmpfs / emptyDir) and /var/lib/calcinosis (CDS_DATA_DIR, a volume);
#   - holds no secrets: database/broker URLs, subscription secrets and SMART keys come from the
#     environment or mounted files at run time (see .env.example and helm/calcinosis-cds).
ARG PYTHON_IMAGE=python:3.11.10-slim-bookworm

# --- builder: build the wheel and install it (with its dependencies) into a self-contained venv ----
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Only what the distribution needs (tests, docs, helm and compose files stay out; see .dockerignore).
COPY pyproject.toml README.md ./
COPY service ./service
COPY workers ./workers

RUN pip install --upgrade pip setuptools wheel \
 && pip wheel --no-deps --wheel-dir /wheels . \
 && pip install /wheels/*.whl \
 && python -m compileall -q /opt/venv

# --- runtime -----------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG VERSION=0.1.0
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown

LABEL org.opencontainers.image.title="calcinosis-cds" \
      org.opencontainers.image.description="FHIR clinical decision support for calciphylaxis and metastatic calcification risk (API, Celery workers, beat)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="calcinosis-cds" \
      org.opencontainers.image.documentation="docs/operations.md"

# A fixed numeric user so Kubernetes can verify runAsNonRoot without a passwd lookup.
RUN groupadd --system --gid 10001 cds \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/calcinosis --no-create-home \
      --shell /usr/sbin/nologin cds \
 && mkdir -p /var/lib/calcinosis /app \
 && chown 10001:10001 /var/lib/calcinosis

COPY --from=builder /opt/venv /opt/venv
# Clinical content (data, reviewed like code) is read from here; it is not part of the wheel.
COPY mappings /app/mappings

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    CDS_DATA_DIR=/var/lib/calcinosis \
    CDS_MAPPINGS_DIR=/app/mappings \
    CDS_HOST=0.0.0.0 \
    CDS_PORT=8080

# The working directory is the writable data volume, so any relative file a library writes lands there.
WORKDIR /var/lib/calcinosis
VOLUME ["/var/lib/calcinosis"]

USER 10001:10001
EXPOSE 8080

# Liveness of the API role (slim images carry no curl). Worker and beat containers override or disable
# this check (docker-compose.yml sets `healthcheck: disable: true` for them).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('CDS_PORT', '8080'); sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:' + port + '/healthz', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["calcinosis-cds"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
