# Postlane worker image, built by docker-compose.yml (or `docker build -t postlane .`).
# The entrypoint runs the workers (`python worker.py`); arguments are passed on, e.g.
# `--lanes a,b` or `--json-logs`. Other commands: `docker run --entrypoint postlane IMAGE setup`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    POSTLANE_CONFIG=/app/deploy/postlane.toml \
    PYTHONTZPATH=

WORKDIR /app

# Runtime dependencies only, at the versions and hashes of requirements/production.lock: no
# [dev] (Temporal dev server, SMTP catcher) and no [testing] (test server, pytest). Their
# own layer, so a code change does not reinstall them. PYTHONTZPATH= (empty) makes zoneinfo
# read the pinned tzdata package rather than the base image's zone files.
COPY requirements/production.lock requirements/production.lock
RUN pip install --require-hashes -r requirements/production.lock

# deploy/postlane.toml is copied as a default; docker-compose.yml mounts ./deploy over it so
# lanes change without a rebuild.
COPY . .
RUN pip install --no-deps . \
    && useradd --system --uid 10001 --user-group --no-create-home --home-dir /app postlane

USER postlane

ENTRYPOINT ["python", "worker.py"]
