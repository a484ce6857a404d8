# syntax=docker/dockerfile:1
# cruddur-syncd as a sidecar image: built with the Rust image, run on distroless as non-root.
#   docker build -t cruddur-syncd .
#   docker run -v ./config.toml:/etc/cruddur-syncd/config.toml:ro -p 7077:7077 -p 9177:9177 cruddur-syncd
# The config must listen on 0.0.0.0 inside a container (config/production.toml does).

FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, in their own layer: a source change does not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > benches/stream_decode.rs \
    && cargo build --release --locked --bin cruddur-syncd \
    && rm -rf src benches
COPY src ./src
COPY benches ./benches
# touch: the stub's build output is older than the real sources, but make sure cargo sees them.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin cruddur-syncd \
    && install -D -m 0755 target/release/cruddur-syncd /out/cruddur-syncd

# distroless/cc: glibc and libgcc only, no shell, no package manager; "nonroot" is uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/cruddur-syncd /usr/local/bin/cruddur-syncd
COPY config/production.toml /etc/cruddur-syncd/config.toml
USER nonroot:nonroot
# 7077: the API. 9177: the admin listener (/livez, /readyz, /metrics): point the
# orchestrator's liveness and readiness probes and the Prometheus scrape at it.
EXPOSE 7077 9177
# No HEALTHCHECK: distroless has no shell or curl to run one. Orchestrators probe
# GET :9177/livez and :9177/readyz themselves (see deploy/kubernetes.yaml).
ENTRYPOINT ["/usr/local/bin/cruddur-syncd"]
CMD ["--config", "/etc/cruddur-syncd/config.toml", "run"]
