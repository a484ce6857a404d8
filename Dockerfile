# syntax=docker/dockerfile:1
# cruddur-syncd as a sidecar image: built with the Rust image, run on distroless as non-root.
#
#   docker build -t cruddur-syncd \
#     --build-arg VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)" \
#     --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg SOURCE=https://example.com/your/cruddur-syncd .
#   docker run -e CRUDDUR_SYNCD__POSTGRES__URL=postgres://... \
#     -e CRUDDUR_SYNCD__AUTH__USER_POOL_ID=... -e CRUDDUR_SYNCD__AUTH__CLIENT_ID=... \
#     -p 7077:7077 -p 9177:9177 cruddur-syncd
#
# No machine of this project can pull base images, so CI proves the build stages another way:
# scripts/check-image replays `plan` and `build` on the host (the same script, the same stub
# layout, the same cargo commands) and checks what they produce. Keep the two in step: it
# greps this file for the commands it replays.

# plan: the dependency-only skeleton (Cargo.toml, Cargo.lock, a stub per target). It reruns on
# every source change, but its output changes only with the manifest, so the COPY --from below
# stays cached and the dependencies are not rebuilt.
FROM rust:1-bookworm AS plan
WORKDIR /src
COPY . .
RUN scripts/stub-targets /stubs

FROM rust:1-bookworm AS build
WORKDIR /src
COPY --from=plan /stubs/ ./
# Dependencies first, in their own layer: a source change does not rebuild them.
RUN cargo build --locked --release
COPY . .
ARG REVISION=unknown
# touch: the real sources may be older than the stubs' build; cargo must see them as changed.
RUN xargs touch -- <.stub-targets \
    && CRUDDUR_SYNCD_REVISION="$REVISION" cargo build --locked --release \
    && install -D -m 0755 target/release/cruddur-syncd /out/cruddur-syncd

# distroless/cc: glibc and libgcc only, no shell, no package manager; "nonroot" is uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="cruddur-syncd" \
      org.opencontainers.image.description="Cache-sync daemon and operator tools for Cruddur's DynamoDB-backed messaging" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.version="${VERSION}"
COPY --from=build /out/cruddur-syncd /usr/local/bin/cruddur-syncd
# Works with environment variables alone (see the file); mount another over it to change more.
COPY config/container.toml /etc/cruddur-syncd/config.toml
ENV CRUDDUR_SYNCD_CONFIG=/etc/cruddur-syncd/config.toml
# Numeric, so that Kubernetes' runAsNonRoot can verify it without a passwd lookup.
USER 65532:65532
# 7077: the API. 9177: the admin listener (/livez, /readyz, /metrics): point the
# orchestrator's probes and the Prometheus scrape at it.
EXPOSE 7077 9177
# No HEALTHCHECK: distroless has no shell or curl to run one. Orchestrators probe
# GET :9177/livez and :9177/readyz themselves (see deploy/kustomize/).
ENTRYPOINT ["/usr/local/bin/cruddur-syncd"]
CMD ["run"]
