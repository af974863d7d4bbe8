# syntax=docker/dockerfile:1
# stoker-controller. Build from the repository root:
#   docker build -f images/controller.Dockerfile -t stoker-controller .

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p stoker-controller --bin stoker-controller \
    && install -D -m 0755 target/release/stoker-controller /out/stoker-controller

# Distroless: glibc, CA certificates and nothing else; runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/stoker-controller /usr/local/bin/stoker-controller
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/stoker-controller"]
