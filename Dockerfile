# filesrv daemon image. On a machine that reaches Docker Hub the default base works as is;
# without a registry, build the base with rig/build-base-image.sh and pass
#   --build-arg BASE_IMAGE=filesrv-base:bookworm
ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}

# xxh128sum is the reference the rig checks digests with; ip, ss and ps to inspect
RUN if ! command -v xxh128sum >/dev/null || ! command -v ip >/dev/null \
       || ! command -v ps >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends xxhash iproute2 procps \
      && rm -rf /var/lib/apt/lists/*; \
    fi

# a venv: Debian's system Python is "externally managed"
RUN python3 -m venv /opt/filesrv
ENV PATH=/opt/filesrv/bin:$PATH
COPY pyproject.toml README.md /src/
COPY filesrv /src/filesrv
COPY man/filesrv.1 /src/man/filesrv.1
RUN pip install --no-cache-dir --disable-pip-version-check /src && rm -rf /src
COPY rig/faultproxy.py /opt/filesrv-rig/faultproxy.py

# The daemon (and the rig's client) run as an unprivileged user. /srv/storage is its own:
# a named volume mounted there starts empty with this owner (an older volume made by a root
# image needs: docker compose run --rm -u root server chown -R filesrv: /srv/storage).
RUN useradd --system --user-group --uid 10001 --create-home --home-dir /home/filesrv \
      --shell /usr/sbin/nologin filesrv \
    && install -d -o filesrv -g filesrv -m 750 /srv/storage
USER filesrv
WORKDIR /home/filesrv

EXPOSE 8750
HEALTHCHECK --interval=2s --timeout=5s --start-period=2s --retries=15 \
  CMD filesrv ls -s 127.0.0.1:8750 --retries 0 >/dev/null || exit 1
CMD ["filesrv", "serve", "--root", "/srv/storage", "--host", "0.0.0.0", "--port", "8750"]
