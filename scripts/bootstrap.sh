#!/usr/bin/env bash
# Installs everything building and testing ztunnel needs, and nothing that is
# already there. Idempotent: on a machine that has it all it takes seconds.
# Called by `cargo xtask bootstrap`, `cargo xtask demo` and `.ci/run`.
set -euo pipefail

LLVM_VERSION=22
BPF_LINKER_VERSION=0.13
# Builds and runs fuzz/'s targets (`cargo xtask fuzz`, and briefly in `cargo xtask test`).
CARGO_FUZZ_VERSION=0.13
DEB_PACKAGES=(
  "llvm-${LLVM_VERSION}-dev" "libpolly-${LLVM_VERSION}-dev" libzstd-dev
  iproute2 iperf3 bpftool tcpdump procps ethtool curl nftables python3-venv
)
# Validates deploy/'s manifests offline against Kubernetes' schema.
KUBERNETES_VALIDATE_VERSION=1.37.0
TOOLS_VENV="${XDG_CACHE_HOME:-$HOME/.cache}/ztunnel/venv"

log() { printf '[bootstrap] %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  log "must run as root (installs Debian packages; the lab needs CAP_NET_ADMIN and CAP_BPF)"
  exit 1
fi

missing=()
for pkg in "${DEB_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  log "Debian packages present"
fi

if ! rustup toolchain list | grep -q '^nightly'; then
  log "installing nightly toolchain"
  rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
  log "adding rust-src to nightly (needed for -Z build-std=core)"
  rustup component add rust-src --toolchain nightly
else
  log "nightly rust-src present"
fi

CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"
if ! "$CARGO_BIN/bpf-linker" --version 2>/dev/null | grep -q "bpf-linker ${BPF_LINKER_VERSION}"; then
  log "building bpf-linker ${BPF_LINKER_VERSION} against LLVM ${LLVM_VERSION} (about 2 minutes)"
  # The LLVM 22 tools must come first on PATH, or llvm-sys finds another
  # llvm-config and the link of -lLLVM fails.
  PATH="/usr/lib/llvm-${LLVM_VERSION}/bin:$PATH" \
    cargo install bpf-linker --locked --version "~${BPF_LINKER_VERSION}" \
      --no-default-features --features "llvm-${LLVM_VERSION}"
else
  log "bpf-linker present"
fi

if ! cargo fuzz --version 2>/dev/null | grep -q "cargo-fuzz ${CARGO_FUZZ_VERSION}"; then
  log "installing cargo-fuzz ${CARGO_FUZZ_VERSION} (about a minute)"
  cargo install cargo-fuzz --locked --version "~${CARGO_FUZZ_VERSION}"
else
  log "cargo-fuzz present"
fi

if ! "$TOOLS_VENV/bin/kubernetes-validate" --version 2>/dev/null | grep -qx "$KUBERNETES_VALIDATE_VERSION"; then
  log "installing kubernetes-validate ${KUBERNETES_VALIDATE_VERSION} into $TOOLS_VENV"
  python3 -m venv "$TOOLS_VENV"
  "$TOOLS_VENV/bin/pip" install --quiet --disable-pip-version-check \
    "kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}"
else
  log "kubernetes-validate present"
fi

# The lab's and tests' bpffs: ztunnel mounts it itself when missing, but
# bpftool inspection in tests wants it early too.
if ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf
fi
log "done"
