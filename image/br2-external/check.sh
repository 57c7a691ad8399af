#!/bin/sh
# Checks this BR2_EXTERNAL tree as far as possible without buildroot:
# the files buildroot needs, the Kconfig symbols the defconfig and the
# package use, shell syntax of the scripts (here and in image/rootfs/),
# the GPT layout against xtask/src/image.rs. With $BUILDROOT (a buildroot
# checkout) it also runs `make trustbind_appliance_defconfig` in a
# temporary output directory, which parses Config.in and the defconfig.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
fail=0
bad() { echo "check: $*" >&2; fail=1; }

for f in external.desc Config.in external.mk \
    package/trustbind-appliance/Config.in \
    package/trustbind-appliance/trustbind-appliance.mk \
    configs/trustbind_appliance_defconfig \
    board/trustbind/post-build.sh board/trustbind/post-image.sh \
    board/trustbind/genimage.cfg board/trustbind/busybox.fragment; do
    [ -f "$here/$f" ] || bad "missing $f"
done
grep -q '^name: TRUSTBIND$' "$here/external.desc" || bad "external.desc: name is not TRUSTBIND"

# Every BR2_PACKAGE_TRUSTBIND_* symbol the defconfig sets is defined.
for sym in $(sed -n 's/^\(BR2_PACKAGE_TRUSTBIND_[A-Z_]*\)=.*/\1/p' "$here/configs/trustbind_appliance_defconfig"); do
    grep -rq "^config ${sym}\$" "$here" --include=Config.in || bad "defconfig sets $sym, no Config.in defines it"
done
# Config.in sources exist.
for src in $(sed -n 's/^source "\$BR2_EXTERNAL_TRUSTBIND_PATH\/\(.*\)"/\1/p' "$here/Config.in"); do
    [ -f "$here/$src" ] || bad "Config.in sources missing $src"
done
# The package uses the cargo infrastructure and the workspace member.
grep -q '\$(eval \$(cargo-package))' "$here/package/trustbind-appliance/trustbind-appliance.mk" \
    || bad "the package does not use cargo-package"
[ -f "$root/appliance/Cargo.toml" ] || bad "no appliance/Cargo.toml at the SITE the package names"
# Paths the defconfig points at (relative to this tree).
for p in $(sed -n 's/.*\$(BR2_EXTERNAL_TRUSTBIND_PATH)\/\([^" ]*\).*/\1/p' "$here/configs/trustbind_appliance_defconfig"); do
    [ -e "$here/$p" ] || bad "defconfig names missing $p"
done
# Shell syntax.
for s in "$here"/board/trustbind/*.sh "$here/check.sh" \
    "$root"/image/rootfs/etc/init.d/rcS "$root"/image/rootfs/etc/init.d/rcK \
    "$root"/image/rootfs/etc/acpi/PWRF/00000080 \
    "$root"/image/rootfs/usr/libexec/trustbind/*; do
    sh -n "$s" || bad "shell syntax: $s"
done
# The GPT layout matches the xtask builder's.
for uuid in $(grep -o '[0-9A-F]\{8\}-[0-9A-F]\{4\}-[0-9A-F]\{4\}-[0-9A-F]\{4\}-[0-9A-F]\{12\}' "$here/board/trustbind/genimage.cfg"); do
    grep -q "$uuid" "$root/xtask/src/image.rs" || bad "genimage.cfg: $uuid is not in xtask/src/image.rs"
done
grep -q 'root=PARTUUID=5B1C7A3E-2F0D-4C8E-9A61-7D2E4B8F0A01' "$root/image/rootfs/boot/grub/grub.cfg" \
    || bad "grub.cfg does not boot the system partition's PARTUUID"

if [ -n "${BUILDROOT:-}" ]; then
    out=$(mktemp -d)
    trap 'rm -rf "$out"' EXIT
    echo "check: make -C $BUILDROOT BR2_EXTERNAL=$here O=$out trustbind_appliance_defconfig"
    make -C "$BUILDROOT" BR2_EXTERNAL="$here" O="$out" trustbind_appliance_defconfig >"$out.log" 2>&1 \
        || { cat "$out.log" >&2; bad "the defconfig does not parse"; }
    grep -q '^BR2_PACKAGE_TRUSTBIND_APPLIANCE=y' "$out/.config" \
        || bad "BR2_PACKAGE_TRUSTBIND_APPLIANCE did not survive the defconfig"
else
    echo "check: BUILDROOT is not set; skipped the defconfig parse"
fi
[ "$fail" -eq 0 ] && echo "check: ok"
exit "$fail"
