#!/bin/sh
# Buildroot post-image script: the GPT disk image (genimage.cfg), then GRUB
# for BIOS installed into it the way `cargo xtask image` does (boot.img
# into sector 0 pointing at the BIOS-boot partition, core.img there).
set -eu
BOARD_DIR=$(dirname "$0")
support/scripts/genimage.sh -c "$BOARD_DIR/genimage.cfg"
echo "(hd0) $BINARIES_DIR/disk.img" >"$BINARIES_DIR/device.map"
"$HOST_DIR/sbin/grub-bios-setup" -m "$BINARIES_DIR/device.map" \
    -d "$BINARIES_DIR" -b boot.img -c grub.img -r "hd0,gpt2" "$BINARIES_DIR/disk.img"
