# syntax=docker/dockerfile:1
#
# One image for every role of the service; docker-compose.yml picks the role with `command:`
#   orchestrator worker io | orchestrator worker cpu | orchestrator worker fanin
#   orchestrator flower    | orchestrator db upgrade
#
#   docker build -t celery-orchestrator .
#   docker build --build-arg EXTRAS=gevent -t celery-orchestrator:gevent .   # for ORCH_IO_POOL=gevent

# The base of every stage: the official Python image by default. Any Debian-like image with Python 3.11+
# (`python`, with venv) and groupadd/useradd will do, e.g. one built locally where no registry is
# reachable (scripts/containers.sh: Debian's python3 in a debootstrapped base).
ARG PYTHON_IMAGE=python:3.11-slim

# --- requirements: what pyproject.toml asks pip for, and nothing else of the file -----------------
FROM ${PYTHON_IMAGE} AS requirements
COPY pyproject.toml /src/
# Optional extras of the project, comma-separated (e.g. gevent).
ARG EXTRAS=""
RUN python -c 'import os, tomllib; \
p = tomllib.load(open("/src/pyproject.toml", "rb")); \
extras = [e for e in os.environ["EXTRAS"].split(",") if e]; \
needs = p["build-system"]["requires"] + p["project"]["dependencies"]; \
needs += [r for e in extras for r in p["project"]["optional-dependencies"][e]]; \
print("\n".join(needs))' > /requirements.txt

# --- build: install the project (not editable, no dev/test tools) into a virtualenv ---------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/orchestrator
ENV PATH=/opt/orchestrator/bin:$PATH
# The dependencies first, as wheels, in a layer that only a change to the list above rebuilds: a change
# to the code reinstalls from these wheels without going back to the package index.
COPY --from=requirements /requirements.txt /wheels/
RUN pip wheel --wheel-dir /wheels -r /wheels/requirements.txt
WORKDIR /src
# Only what `pip install .` needs (see .dockerignore): no tests, no .env, no .git.
COPY pyproject.toml README.md ./
COPY orchestrator ./orchestrator
# The Alembic scripts: the package ships them as orchestrator/migrations, for `orchestrator db upgrade`.
COPY alembic ./alembic
COPY jobs ./jobs
ARG EXTRAS=""
RUN PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels pip install ".${EXTRAS:+[$EXTRAS]}" \
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
