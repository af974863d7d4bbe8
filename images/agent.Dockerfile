# syntax=docker/dockerfile:1
# stoker-agent: the node agent (containerd snapshotter + FUSE). Build from the
# repository root:  docker build -f images/agent.Dockerfile -t stoker-agent .
# (`make images` builds all three images.)

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target dir between builds; the binary is
# copied out of the cached target dir in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p stoker-agent --bin stoker-agent \
    && install -D -m 0755 target/release/stoker-agent /out/stoker-agent

# Runtime: glibc, fuse3 (fusermount3, for unprivileged unmount paths), and CA
# certificates for registries. `test` (coreutils) serves the readiness probe.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends fuse3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/stoker-agent /usr/local/bin/stoker-agent
ENTRYPOINT ["/usr/local/bin/stoker-agent"]
