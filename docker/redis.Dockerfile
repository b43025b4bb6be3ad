# Redis from Debian's redis-server package, for hosts that cannot pull the registry's redis image
# (make test-compose builds it so; compose takes it as LUNA_REDIS_IMAGE). It behaves as that image does
# for the stack: redis-server on PATH, data in /data (the working directory), an unprivileged user.
#
# Offline: the build context is a directory holding redis-server's .deb files and those of every
# dependency the base lacks, as `apt-get install --download-only` resolves them on the host (apt checks
# each against the archive's signed index there); BuildKit bind-mounts them for the install only.
ARG BASE_IMAGE=debian:12.11-slim
FROM ${BASE_IMAGE}

# The redis user is made first, with numeric ids (so runAsNonRoot can verify them); the package's
# scripts take it as it is. policy-rc.d: those scripts must not start a server inside the build.
RUN --mount=type=bind,target=/debs \
    groupadd --system --gid 10001 redis \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/redis --shell /usr/sbin/nologin redis \
    && printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d \
    && chmod +x /usr/sbin/policy-rc.d \
    && dpkg -i /debs/*.deb \
    && rm /usr/sbin/policy-rc.d \
    && install -d -o 10001 -g 10001 -m 0750 /data

WORKDIR /data
USER 10001:10001
EXPOSE 6379
# REDISCLI_AUTH: the password redis-cli sends (compose sets it from LUNA_REDIS_PASSWORD).
HEALTHCHECK --interval=5s --timeout=3s --retries=5 CMD ["redis-cli", "ping"]
CMD ["redis-server"]
