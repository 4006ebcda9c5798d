# syntax=docker/dockerfile:1
#
# One image for every role of the service; docker-compose.yml picks the role with `command:`
#   orchestrator worker io | orchestrator worker cpu | orchestrator worker fanin
#   orchestrator flower    | orchestrator db upgrade
#
#   docker build -t celery-orchestrator .
#   docker build --build-arg EXTRAS=gevent -t celery-orchestrator:gevent .   # for ORCH_IO_POOL=gevent

ARG PYTHON_IMAGE=python:3.11-slim

# --- build: install the project (not editable, no dev/test tools) into a virtualenv ---------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/orchestrator
ENV PATH=/opt/orchestrator/bin:$PATH
WORKDIR /src
# Only what `pip install .` needs (see .dockerignore): no tests, no .env, no .git.
COPY pyproject.toml README.md ./
COPY orchestrator ./orchestrator
# The Alembic scripts: the package ships them as orchestrator/migrations, for `orchestrator db upgrade`.
COPY alembic ./alembic
COPY jobs ./jobs
# Optional extras of the project, comma-separated (e.g. gevent).
ARG EXTRAS=""
RUN pip install ".${EXTRAS:+[$EXTRAS]}" \
    && orchestrator --version && celery --version && python -c "import flower"

# --- runtime: the virtualenv only, run by an unprivileged user ------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="celery-orchestrator" \
      org.opencontainers.image.description="Fan-out/fan-in jobs on Celery, tracked in SQL"
RUN groupadd --system --gid 10001 orchestrator \
    && useradd --system --uid 10001 --gid orchestrator --create-home --home-dir /home/orchestrator \
       --shell /usr/sbin/nologin orchestrator
COPY --from=build /opt/orchestrator /opt/orchestrator
ENV PATH=/opt/orchestrator/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ORCH_HOME=/home/orchestrator/.orchestrator
USER orchestrator:orchestrator
WORKDIR /home/orchestrator
# Flower's and the web view's ports (the workers listen on nothing: they consume from the broker).
EXPOSE 5555 8808
# No ENTRYPOINT: a compose service's `command:` is the whole argv, e.g. ["orchestrator", "worker", "io"].
CMD ["orchestrator", "--help"]
