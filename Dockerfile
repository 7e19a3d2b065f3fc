# user-segments: one image for every process (`segments serve`, `segments migrate`, ...).
#
# Reproducible: the base image is pinned by digest, and every Python package comes from
# requirements/runtime.lock (exact versions, each file checked against its hash; made by
# `make lock` from pyproject.toml, the same pins as the tested requirements/dev.lock),
# as wheels only (nothing is compiled).  Python is 3.11, as in development and CI
# (tests/unit/test_build.py checks the minor version, the digest and the lock).
#
# The project is installed in editable mode from /app on purpose: persistence/migrate.py
# finds alembic.ini and migrations/ relative to the repository root
# (Path(__file__).resolve().parent.parent), so the packages must stay in /app next to
# them rather than be copied into site-packages.  Both stages use the same paths, so the
# virtualenv and /app are copied from the build stage as they are.
#
# The image runs as uid 10001 and writes nothing outside /tmp (the metrics directory of
# `serve --workers N`), so it runs with a read-only root filesystem (deploy/kubernetes/).

# python:3.11-slim-bookworm (Python 3.11.16), the multi-platform index digest as
# published in docker-library/repo-info (repos/python/remote/3.11-slim-bookworm.md).
# To move on: take the new digest from there (or `docker buildx imagetools inspect
# python:3.11-slim-bookworm`) and rebuild.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:0bee7276f83efd4a1ee05bbbf4281d95ed28e079220a9457f25a93e3f1e3c31b

FROM ${PYTHON_IMAGE} AS build

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

RUN python -m venv /opt/venv

# Dependencies first, in their own layer, so a code change does not reinstall them.
COPY requirements/runtime.lock /tmp/runtime.lock
RUN /opt/venv/bin/pip install --require-hashes --no-deps --only-binary=:all: -r /tmp/runtime.lock

WORKDIR /app
COPY pyproject.toml alembic.ini ./
COPY migrations/ ./migrations/
COPY persistence/ ./persistence/
COPY cache/ ./cache/
COPY service/ ./service/
# The project itself: no dependencies (all locked above), built by the locked setuptools.
# Bytecode is compiled here: the running containers cannot write it (read-only root).
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation -e . \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/python -m compileall -q /app/service /app/cache /app/persistence /app/migrations \
    && /opt/venv/bin/segments --help > /dev/null

FROM ${PYTHON_IMAGE} AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SEGMENTS_HTTP_HOST=0.0.0.0 \
    SEGMENTS_HTTP_PORT=8080

RUN groupadd --system --gid 10001 segments \
    && useradd --system --uid 10001 --gid segments --no-create-home --shell /usr/sbin/nologin segments

COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
WORKDIR /app

# Numeric, so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001

EXPOSE 8080

HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SEGMENTS_HTTP_PORT', '8080'), timeout=2)" || exit 1

ENTRYPOINT ["segments"]
CMD ["serve"]
