# syntax=docker/dockerfile:1
# Herald's production image. Build: docker build -t herald .
# Run:   docker run -p 8080:8080 -e DATABASE_URL=postgresql://user:pass@host/db \
#          -e HERALD_AUTH_JWT_SECRET=... -e HERALD_AUTH_SESSION_SECRET=... herald
# (docker-compose.yml runs PostgreSQL and two replicas; tests/test_container.py checks both files.)
#
# Stage 1 builds the virtualenv; stage 2 copies it next to the code and runs it as a
# non-root user. Both stages use the same image, so the venv's interpreter links
# (/usr/local/bin/python3.11) are valid in the runtime stage.

FROM python:3.11-slim AS build
# Bytecode is compiled here on purpose: the venv is root-owned in the runtime stage.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY requirements.txt .
# requirements.txt is the one pinned dependency file: runtime packages first, then a
# "# tests" section. Everything is installed from it (so the image gets exactly the
# versions the tests ran against), then the packages listed under "# tests" are
# uninstalled: playwright (with its bundled Node driver) and ruff are most of the weight.
# Trade-off: their smaller dependencies (pluggy, iniconfig, pygments, pyee,
# greenlet, ...) stay, because pip cannot tell which of those nothing else needs; a
# second, runtime-only requirements file would avoid that, at the cost of two lists to
# keep in step. tests/test_container.py checks that no runtime module imports a package
# from the "# tests" section. No compiler is installed: the pinned packages are taken
# from binary wheels; should one lack a wheel for the target platform, add
# build-essential to this stage only (the runtime stage never needs it).
RUN python -m venv /app/.venv \
 && /app/.venv/bin/pip install -r requirements.txt \
 && sed -n '/^# tests/,$p' requirements.txt > /tmp/test-only.txt \
 && test -s /tmp/test-only.txt \
 && /app/.venv/bin/pip uninstall -y -r /tmp/test-only.txt \
 && rm /tmp/test-only.txt

FROM python:3.11-slim AS runtime
# HERALD_SERVER_HOST: settings.toml binds 127.0.0.1, which a container's published port
# cannot reach; inside the container Herald listens on every interface.
# Workers: server.workers stays "auto", one worker process per core this container may
# use. "auto" is server.settings.available_cores(): the CPU affinity mask capped by the
# cgroup v2 CPU quota (/sys/fs/cgroup/cpu.max), so `docker run --cpus 2` (or compose's
# `cpus: 2`) gives two workers, not one per host core. On a cgroup v1 host only the
# affinity mask counts: use --cpuset-cpus, or set HERALD_SERVER_WORKERS=N explicitly.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/app/.venv/bin:$PATH \
    HERALD_SERVER_HOST=0.0.0.0 \
    HERALD_SERVER_PORT=8080
# A fixed numeric uid/gid, so USER is numeric (Kubernetes' runAsNonRoot can verify it)
# and volumes can be prepared with the right owner. The home directory is writable for
# libraries that keep caches there (pgserver when no DATABASE_URL is given).
RUN groupadd --system --gid 10001 herald \
 && useradd --system --uid 10001 --gid herald --create-home --home-dir /home/herald \
      --shell /usr/sbin/nologin herald
WORKDIR /app
COPY --from=build /app/.venv /app/.venv
# The code stays owned by root (the server cannot rewrite itself); only var/ is the
# user's: the static build (server.static_build_dir = var/static, rebuilt at every
# start), generated secrets (auth.secrets_dir = var, used only when
# HERALD_AUTH_JWT_SECRET / HERALD_AUTH_SESSION_SECRET are not given; every replica must
# be given the same ones) and the embedded PostgreSQL (var/pgdata, only without
# DATABASE_URL). Mount a volume on /app/var to keep generated secrets across containers.
COPY . /app
RUN python -m compileall -q /app/run.py /app/server /app/handlers /app/middlewares \
 && mkdir -p /app/var \
 && chown 10001:10001 /app/var \
 && chmod 0700 /app/var
USER 10001:10001
EXPOSE 8080
# The supervisor drains on SIGTERM: workers get server.shutdown_timeout (10 s) to finish
# requests, plus 5 s before they are killed. Docker's default stop timeout is 10 s, so
# stop with `docker stop -t 20` (docker-compose.yml sets stop_grace_period: 20s).
STOPSIGNAL SIGTERM
# The slim image has no curl: ask /healthz with the venv's Python (urlopen raises on
# anything but 2xx, so the exit status is 1 on failure).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["/app/.venv/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('HERALD_SERVER_PORT', '8080'), timeout=4)"]
# The README's run command (`.venv/bin/python run.py`), relative to WORKDIR /app. The
# supervisor is PID 1: it handles SIGTERM/SIGINT/SIGHUP and reaps its workers itself.
CMD [".venv/bin/python", "run.py"]
