# Shared helpers for scripts/run and scripts/test.

step() { printf '\n==> %s\n' "$*"; }

die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Installs Debian packages that are missing (as root, or through sudo).
ensure_apt() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  step "installing ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq || die "apt-get update failed; cannot install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" \
    || die "cannot install ${missing[*]}"
}

# Rust comes from rustup; a C compiler is needed by a few -sys crates.
ensure_toolchain() {
  if ! command -v cargo >/dev/null 2>&1; then
    [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
  fi
  command -v cargo >/dev/null 2>&1 \
    || die "cargo not found: install Rust 1.85 or newer (https://rustup.rs) and retry"
  command -v cc >/dev/null 2>&1 || ensure_apt build-essential
}

# What real microVMs need: QEMU, the guest kernel the default image is built
# from, a static busybox for its initramfs, mkfs.ext4 for data disks and
# iproute2 for VM taps.
ensure_vm_packages() {
  ensure_apt qemu-system-x86 linux-image-cloud-amd64 busybox-static e2fsprogs iproute2
}

# What the partition test, the VM networking test and the failover bench
# need: network namespaces (iproute2), packet filtering inside them
# (iptables), an HTTP client for published ports (curl), and root.
ensure_net_packages() {
  ensure_apt iproute2 iptables curl
  [ "$(id -u)" -eq 0 ] \
    || die "the partition test puts nodes in network namespaces and needs root: run this as root"
}

# A real Prometheus server (and promtool) for the metrics test.
ensure_obs_packages() {
  ensure_apt prometheus
}

# cargo-fuzz (from crates.io) and a C++ compiler for libFuzzer, for the
# fuzz targets in fuzz/ (scripts/fuzz).
ensure_cargo_fuzz() {
  ensure_toolchain
  command -v c++ >/dev/null 2>&1 || ensure_apt g++
  if ! cargo fuzz --version >/dev/null 2>&1; then
    step "installing cargo-fuzz"
    cargo install cargo-fuzz --locked || die "cannot install cargo-fuzz (cargo install cargo-fuzz --locked)"
  fi
  cargo fuzz --version >/dev/null 2>&1 \
    || die "cargo-fuzz was installed but 'cargo fuzz' does not run: is ~/.cargo/bin on PATH?"
}
