# The proclog image: a Rust builder stage and a slim Debian runtime stage holding only the
# `proclog` binary, CA certificates (for TLS to Postgres) and an unprivileged user.
#
#   docker build -t proclog .                          # from the public base images
#
# Base images are build arguments, so the same file builds from locally made images on a
# machine with no registry. `--target prebuilt` skips the Rust stage and copies a binary built
# on the host instead (glibc of the host must not be newer than the runtime image's):
#
#   cargo build --release --locked && mkdir -p target/docker \
#     && cp target/release/proclog target/docker/proclog
#   docker build --target prebuilt --build-arg RUNTIME_IMAGE=my/debian:bookworm -t proclog .

ARG RUNTIME_IMAGE=debian:bookworm-slim
ARG RUST_IMAGE=rust:1-slim-bookworm

# What every runtime variant shares: CA certificates, a non-root user, the port, the health
# check. (Kept first: Docker's classic builder builds every stage before `--target`, and
# every stage when no target is given.)
FROM ${RUNTIME_IMAGE} AS runtime-base
RUN set -eu; \
    if [ ! -s /etc/ssl/certs/ca-certificates.crt ]; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    groupadd --system --gid 10001 proclog; \
    useradd --system --uid 10001 --gid proclog --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin proclog
ENV PROCLOG_LISTEN=0.0.0.0:8080 \
    NO_COLOR=1
EXPOSE 8080
# `proclog probe` asks this pod's /readyz (exit 0 only on 200); no curl in the image.
HEALTHCHECK --interval=5s --timeout=3s --start-period=60s --retries=3 \
    CMD ["proclog", "probe", "--url", "http://127.0.0.1:8080/readyz"]
ENTRYPOINT ["proclog"]
CMD ["pod"]
ARG VERSION=dev
LABEL org.opencontainers.image.title="proclog" \
      org.opencontainers.image.description="Durable process-event logs on Postgres: a pod that runs processes under fenced leases and serves the HTTP API" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"

# A binary built on the host (see above), for machines without the Rust image. Cargo.toml is
# named only so that the COPY always matches a file: the classic builder builds this stage
# for the default target too, when target/docker/proclog is absent.
FROM runtime-base AS prebuilt
COPY Cargo.toml target/docker/proclo[g] /usr/local/bin/
RUN rm /usr/local/bin/Cargo.toml
USER 10001:10001

# The Rust build.
FROM ${RUST_IMAGE} AS builder
WORKDIR /src
COPY . .
ENV CARGO_PROFILE_RELEASE_STRIP=symbols
RUN cargo build --release --locked --bin proclog \
    && install -m 0755 target/release/proclog /usr/local/bin/proclog

# The default image.
FROM runtime-base AS runtime
COPY --from=builder /usr/local/bin/proclog /usr/local/bin/proclog
USER 10001:10001
