#!/bin/sh
# Buildroot post-build script ($1 = TARGET_DIR): what `cargo xtask image`
# does after copying image/rootfs/ (the rootfs overlay).
set -eu
TARGET_DIR=$1
# Mount points the init scripts use; the system partition is read-only.
mkdir -p "$TARGET_DIR/data" "$TARGET_DIR/run" "$TARGET_DIR/tmp" "$TARGET_DIR/boot/grub"
# No console login: root's password is locked.
sed -i 's/^root:[^:]*:/root:!:/' "$TARGET_DIR/etc/shadow"
chmod 600 "$TARGET_DIR/etc/shadow"
ln -sf /proc/self/mounts "$TARGET_DIR/etc/mtab"
echo "buildroot" >"$TARGET_DIR/etc/trustbind-release"
# The kernel lives in the system partition (grub.cfg comes with the
# overlay), as in the xtask image.
cp "$BINARIES_DIR/bzImage" "$TARGET_DIR/boot/bzImage"
