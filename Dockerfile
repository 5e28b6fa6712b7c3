# syntax=docker/dockerfile:1
# Keyward's operator image: a Rust builder, then a distroless glibc runtime (no shell, no package
# manager) running as the non-root user 65532.
#
#   docker build -t keyward:0.1.0 .
#
# The binary is built by the one line marked `keyward:build-command` below. CI runs that exact
# line, read from this file, through e2e/build-image-binary.sh, and the install tests
# (e2e/install.sh) run the binary it produces: the two builds cannot drift apart. Keep the marked
# command on a single line.

# The toolchain the project is built and tested with (rust-version in Cargo.toml is the floor).
FROM docker.io/library/rust:1.95.0-bookworm AS build
WORKDIR /src
COPY . .
# keyward:build-command
RUN cargo build --release --locked --bin keyward
RUN install -D -m 0755 target/release/keyward /out/keyward

# glibc runtime matching the builder's Debian 12 (there is no musl target here): CA certificates,
# libc and libgcc_s only. The `nonroot` tag runs as 65532:65532; USER says it again so that
# Kubernetes' runAsNonRoot can check a numeric user.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/keyward /usr/local/bin/keyward
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/keyward", "run"]
