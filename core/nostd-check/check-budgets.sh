#!/usr/bin/env bash
# Builds the bare-metal back-end (core/nostd-blk linked by this binary) for
# thumbv7em-none-eabihf and aarch64-unknown-none, prints its sections, and
# holds the thumbv7em build to its budgets (tools/budgets.py reads the ELF):
#
#   .text                                  at most TEXT_BUDGET bytes
#   deepest stack of one message           at most STACK_BUDGET bytes
#     (Backend::on_message: framing, Session::handle_into, the actions,
#     the reply; Backend::receive is its framing-and-session part)
#   deepest stack of one request           at most STACK_BUDGET bytes
#     (Backend::serve_request: pop, process, complete, publish)
#
# The RAM budget of the protocol state (session plus both rings' data
# planes, 1 KiB) is a compile-time assertion in core/nostd-blk, printed by
# its test `protocol_state_fits_its_budget`.
#
# The .text target is 32 KiB and the back-end meets it (31,914 bytes);
# the enforced budget is a ratchet just above what it takes today: lower it
# as the core shrinks, never raise it without a reason, never above the
# target. Raised once, 38400 -> 38912: refusing ring sizes and
# addresses on the message that sets them (SET_VRING_NUM/ADDR, and again
# at SET_FEATURES) added 1.1 KiB of checks a hostile front-end needs.
# Lowered 38912 -> 34048 (38720 -> 33806 bytes) by error types that are
# returned in registers and by keeping one copy of control and recovery
# path helpers. Lowered 34048 -> 33152 (33930 -> 33092 bytes): the
# session is reset in place and the back-end built once, WireError
# carries no 64-bit payload, and resubmitted split chains check their
# descriptors out of line. Lowered 33152 -> 32256 (33000 -> 32178 bytes):
# ring errors carry 16-bit payloads (DataPlaneError and BackendError are 8
# bytes), and the session encodes each of its replies with its own small
# function instead of the encoder of every reply. Lowered 32256 -> 32000
# (31,914 bytes): the packed base and a ring's start kept out of line.
#
# Stack depths need `-Z emit-stack-sizes` (RUSTC_BOOTSTRAP on stable): that
# build has its own target directory, so the plain builds stay cached.
set -euo pipefail
cd "$(dirname "$0")"

TEXT_TARGET=32768
TEXT_BUDGET=${TEXT_BUDGET:-32000}
STACK_BUDGET=${STACK_BUDGET:-2048}
dir=${CARGO_TARGET_DIR:-target}
bin=vhost-user-core-nostd-check

for t in thumbv7em-none-eabihf aarch64-unknown-none; do
    cargo build --release --target "$t" --quiet
done
# The back-end with in-band notifications links too (its own target
# directory); its size is printed, not held to the budget.
CARGO_TARGET_DIR="$dir/inband" \
    cargo build --release --target thumbv7em-none-eabihf --features inband --quiet
RUSTC_BOOTSTRAP=1 \
    RUSTFLAGS="-Z emit-stack-sizes -Z unstable-options -C symbol-mangling-version=legacy" \
    CARGO_TARGET_DIR="$dir/stack-sizes" \
    cargo build --release --target thumbv7em-none-eabihf --quiet

status=0
python3 tools/budgets.py --text-budget "$TEXT_BUDGET" --text-target "$TEXT_TARGET" \
    "$dir/thumbv7em-none-eabihf/release/$bin" || status=1
python3 tools/budgets.py "$dir/aarch64-unknown-none/release/$bin"
echo "with in-band notifications (--features inband):"
python3 tools/budgets.py "$dir/inband/thumbv7em-none-eabihf/release/$bin"
python3 tools/budgets.py --no-sections --stack-budget "$STACK_BUDGET" \
    --entry Backend10on_message --entry Backend7receive --entry Backend13serve_request \
    "$dir/stack-sizes/thumbv7em-none-eabihf/release/$bin" || status=1
if [ "$status" != 0 ]; then
    echo "bare-metal back-end: a budget is exceeded (see above)"
fi
exit "$status"
