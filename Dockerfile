# syntax=docker/dockerfile:1
# The policy-agent image: one binary, policy-agent, with its eBPF object embedded (policy-agent/build.rs builds
# policy-ebpf with aya-build and the loader includes the object), on a minimal glibc base.
#
#   docker build -t policy-agent:dev .
#
# The builder repeats the setup the README's commands perform on a Debian bookworm machine (cargo xtask setup):
# Rust 1.95 stable with rust-src, LLVM 22 development packages, and bpf-linker 0.13.0 built against LLVM 22.
# tests/tests/deploy_files.rs keeps these versions and packages in step with the workspace.

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
ARG RUST_VERSION

# LLVM 22 comes from Debian bookworm's own archive (bookworm-security carries llvm-22-dev 1:22.1.8-1~deb12u1; the
# base image enables that suite). A mirror without it falls back to apt.llvm.org's llvm-toolchain-bookworm-22
# repository, which ships the same package names.
RUN set -eux; \
    apt-get update; \
    if ! apt-cache show llvm-22-dev >/dev/null 2>&1; then \
        curl -fsSL https://apt.llvm.org/llvm-snapshot.gpg.key | gpg --dearmor -o /usr/share/keyrings/apt.llvm.org.gpg; \
        echo "deb [signed-by=/usr/share/keyrings/apt.llvm.org.gpg] http://apt.llvm.org/bookworm/ llvm-toolchain-bookworm-22 main" \
            > /etc/apt/sources.list.d/llvm-toolchain-bookworm-22.list; \
        apt-get update; \
    fi; \
    apt-get install -y --no-install-recommends llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev; \
    rm -rf /var/lib/apt/lists/*

# aya-build compiles the eBPF crate with `rustup run stable cargo build -Z build-std=core` (RUSTC_BOOTSTRAP=1 set in
# build.rs). This image installs its compiler as toolchain 1.95.x-<host>, not "stable": alias "stable" to that same
# toolchain directory (rustup takes an existing directory as installed), so userspace and eBPF both build with the
# pinned 1.95 compiler and the build never downloads whatever "stable" means on the day.
RUN set -eux; \
    host="$(rustc -vV | sed -n 's/^host: //p')"; \
    if [ ! -e "${RUSTUP_HOME}/toolchains/stable-${host}" ]; then \
        ln -s "$(rustc --print sysroot)" "${RUSTUP_HOME}/toolchains/stable-${host}"; \
    fi; \
    rustup component add rust-src; \
    rustup run stable rustc -vV | grep -q "^release: ${RUST_VERSION}\."

# Without LLVM_PREFIX bpf-linker searches /usr/lib64 and does not find -lLLVM.
RUN LLVM_PREFIX=/usr/lib/llvm-22 cargo install --locked bpf-linker --version 0.13.0 --no-default-features --features llvm-22

WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    set -eux; \
    cargo build --release --locked --package policy-agent --bin policy-agent; \
    install -D -m 0755 target/release/policy-agent /out/policy-agent

# glibc and libgcc_s, nothing else: no shell, no package manager. The agent runs as root with the capabilities the
# DaemonSet grants (deploy/base/daemonset.yaml); the image's default user is root.
FROM gcr.io/distroless/cc-debian12
COPY --from=build /out/policy-agent /usr/local/bin/policy-agent
ENTRYPOINT ["/usr/local/bin/policy-agent"]
