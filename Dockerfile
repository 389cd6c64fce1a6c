# syntax=docker/dockerfile:1
# Herald: build the virtualenv in one stage, run it as a non-root user in another.
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY requirements.txt .
RUN python3 -m venv .venv && .venv/bin/pip install -r requirements.txt

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    HERALD_SERVER_HOST=0.0.0.0 \
    HERALD_SERVER_PORT=8080
RUN useradd --system --uid 10001 --home-dir /app herald
WORKDIR /app
COPY --from=build /app/.venv /app/.venv
COPY --chown=herald:herald . /app
RUN mkdir -p /app/var && chown herald:herald /app/var
USER herald
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD [".venv/bin/python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"]
CMD [".venv/bin/python", "run.py"]
