#!/usr/bin/env bash
# Builds the C ABI's staticlib for thumbv7em-none-eabihf (no std, the
# crate's panic handler), links adapter-c/baremetal/main.c against it with
# arm-none-eabi-gcc (newlib's nosys specs: no OS), and prints the
# program's .text size.
set -euo pipefail
cd "$(dirname "$0")/../.."
target=thumbv7em-none-eabihf
# The workspace's release profile unwinds and optimises for speed (hosted
# daemons); a bare-metal staticlib aborts and optimises for size, as the
# no_std firmware of core/nostd-check does. Only the staticlib: a cdylib
# means nothing here.
cargo rustc --quiet -p vhost-user-c --lib --crate-type staticlib --release \
    --target "$target" --no-default-features --features panic-handler \
    --config 'profile.release.panic="abort"' \
    --config 'profile.release.opt-level="s"' \
    --config 'profile.release.lto=true'
out=target/$target/release
arm-none-eabi-gcc -mcpu=cortex-m4 -mthumb -mfloat-abi=hard -mfpu=fpv4-sp-d16 \
    -std=c11 -Wall -Wextra -Werror -Os -ffunction-sections -fdata-sections \
    -I adapter-c/include adapter-c/baremetal/main.c "$out/libvhost_user_c.a" \
    --specs=nosys.specs -Wl,--gc-sections -Wl,--no-warn-execstack -o "$out/vhu-baremetal.elf"
arm-none-eabi-size -A "$out/vhu-baremetal.elf" | awk '$1 == ".text" { printf "bare-metal C program linked: .text %d bytes\n", $2 }'
