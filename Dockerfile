# user-segments: one image for every process (`segments serve`, `segments migrate`, ...).
#
# The project is installed in editable mode from /app on purpose: persistence/migrate.py
# finds alembic.ini and migrations/ relative to the repository root
# (Path(__file__).resolve().parent.parent), so the packages must stay in /app next to
# them rather than be copied into site-packages.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SEGMENTS_HTTP_HOST=0.0.0.0 \
    SEGMENTS_HTTP_PORT=8080

RUN groupadd --system --gid 10001 segments \
    && useradd --system --uid 10001 --gid segments --no-create-home --shell /usr/sbin/nologin segments

WORKDIR /app

# Dependencies first, in their own layer, so a code change does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY alembic.ini ./
COPY migrations/ ./migrations/
COPY persistence/ ./persistence/
COPY cache/ ./cache/
COPY service/ ./service/
RUN pip install --no-cache-dir --no-deps -e . \
    && segments --help > /dev/null

USER segments

EXPOSE 8080

HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SEGMENTS_HTTP_PORT', '8080'), timeout=2)" || exit 1

ENTRYPOINT ["segments"]
CMD ["serve"]
