#!/usr/bin/env bash
# The project's one test command (README.md names it; .ci/run runs it).
# Installs what it needs itself, so it works on a fresh machine that has only
# the Rust toolchain, gcc, python3 and qemu-utils.
#
#   VHU_FUZZ_SECONDS   seconds per fuzz target (default 60; 0 skips fuzzing)
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR=never
fuzz_seconds=${VHU_FUZZ_SECONDS:-60}

step() { printf '\n==> %s\n' "$*"; }

step "toolchain pieces"
rustup component add rustfmt clippy >/dev/null 2>&1 || true
rustup target add thumbv7em-none-eabihf aarch64-unknown-none >/dev/null
if [ "$fuzz_seconds" != 0 ] && ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked --quiet
fi

step "format"
cargo fmt --all --check

step "clippy (all targets, -D warnings)"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "docs (-D warnings)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

step "no_std gate: the core for thumbv7em-none-eabihf (plain and with defmt), and a whole bare-metal vhost-user-blk back-end for thumbv7em and aarch64 within its budgets"
cargo build -p vhost-user-core --target thumbv7em-none-eabihf --quiet
cargo build -p vhost-user-core --target thumbv7em-none-eabihf --features defmt --quiet
(cd core/nostd-check &&
    cargo build --release --target thumbv7em-none-eabihf --features defmt --quiet)
# Builds both targets, prints their sections, fails on a budget exceeded
# (.text, the stack of one message and of one request).
bash core/nostd-check/check-budgets.sh

step "guest kit: a Debian cloud kernel and a busybox initramfs (cached under \${VHU_CACHE:-~/.cache/vhu}), and QEMU"
bash examples/tests/guest/build-guest.sh

step "DPDK testpmd (the net interop peer), if missing"
bash examples/tests/dpdk/install-dpdk.sh

step "tests"
cargo test --workspace --no-fail-fast 2>&1 | tee target/test.log
# A summary line the CI reader understands.
python3 - <<'PY'
import re
passed = failed = 0
for line in open("target/test.log"):
    m = re.match(r"test result: \w+\. (\d+) passed; (\d+) failed", line)
    if m:
        passed += int(m.group(1)); failed += int(m.group(2))
print(f"\ntests: {passed} passed, {failed} failed")
PY

if [ "$fuzz_seconds" != 0 ]; then
    for target in $(cd core && cargo fuzz list); do
        step "fuzz $target for ${fuzz_seconds}s"
        log="$PWD/target/fuzz-$target.log"
        if ! (cd core && RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" -- \
            -max_total_time="$fuzz_seconds" -print_final_stats=1 >"$log" 2>&1); then
            tail -n 60 "$log"
            echo "fuzz target $target failed"
            exit 1
        fi
        grep -E '^stat::(number_of_executed_units|peak_rss_mb)' "$log" || true
    done
fi

step "all checks passed"
