# Shared shell functions of the Trustbind appliance's init scripts.
# POSIX sh: runs under busybox ash on the appliance and under the build
# host's sh in the supervisor test. Source it; it defines functions only.

TB_DATA=${TB_DATA:-/data}
TB_STATE=${TB_STATE:-$TB_DATA/trustbind}
TB_DAEMON=${TB_DAEMON:-/usr/bin/trustbind-appliance}
TB_RUN=${TB_RUN:-/run/trustbind}
TB_ADMIN_PORT=7445

# Prints to the console (and stderr when there is no console).
tb_say() {
    if [ -w /dev/console ]; then
        echo "$*" >/dev/console
    else
        echo "$*" >&2
    fi
}

# Whether something is mounted at $1 (busybox-static has no mountpoint).
tb_mounted() {
    grep -qs "^[^ ]* $1 " /proc/mounts
}

# Value of kernel command-line key $1 (e.g. trustbind.ip), or nothing.
# Reads $TB_CMDLINE when set (tests), else /proc/cmdline.
tb_cmdline() {
    for w in $(cat "${TB_CMDLINE:-/proc/cmdline}" 2>/dev/null); do
        case "$w" in
            "$1"=*) echo "${w#*=}" ;;
        esac
    done | tail -n 1
}

# Whether the kernel command line holds the bare word $1.
tb_cmdline_flag() {
    for w in $(cat "${TB_CMDLINE:-/proc/cmdline}" 2>/dev/null); do
        [ "$w" = "$1" ] && return 0
    done
    return 1
}

# Value of KEY in a `KEY=value` file ($1 file, $2 key); comments and
# blank lines are ignored, the last assignment wins; no shell evaluation.
tb_conf() {
    [ -r "$1" ] || return 0
    sed -n "s/^[[:space:]]*$2[[:space:]]*=[[:space:]]*//p" "$1" \
        | sed 's/[[:space:]]*$//; s/^"\(.*\)"$/\1/' | tail -n 1
}

# Whether $1 looks like A.B.C.D/NN (or A.B.C.D when $2 is "noprefix").
tb_valid_ip() {
    case "$2" in
        noprefix) echo "$1" | grep -Eq '^([0-9]{1,3}\.){3}[0-9]{1,3}$' ;;
        *) echo "$1" | grep -Eq '^([0-9]{1,3}\.){3}[0-9]{1,3}/[0-9]{1,2}$' ;;
    esac
}

# The block device holding the partition named (GPT) or labelled (fs) $1,
# as /dev/NAME, or nothing.
tb_find_part() {
    for u in /sys/class/block/*/uevent; do
        [ -r "$u" ] || continue
        if grep -qx "PARTNAME=$1" "$u"; then
            echo "/dev/$(sed -n 's/^DEVNAME=//p' "$u")"
            return 0
        fi
    done
    findfs "LABEL=$1" 2>/dev/null
}

# Whether block device $1 carries the ext2/3/4 magic (0xEF53 at byte 1080).
tb_is_ext4() {
    [ "$(dd if="$1" bs=1 skip=1080 count=2 2>/dev/null | od -An -tx1 | tr -d ' \n')" = "53ef" ]
}

# Prints a loud, framed message block on the console.
tb_loud() {
    tb_say ""
    tb_say "################################################################"
    for l in "$@"; do
        tb_say "## $l"
    done
    tb_say "################################################################"
    tb_say ""
}

# Whether something listens on TCP port $1 (from /proc/net/tcp{,6}).
tb_listening() {
    hex=$(printf '%04X' "$1")
    cat /proc/net/tcp /proc/net/tcp6 2>/dev/null \
        | awk -v p=":$hex" '$2 ~ p"$" && $4 == "0A" { found = 1 } END { exit !found }'
}

# Appends stdin line by line to the console and to log file $1, keeping
# the log under $2 bytes (one rotated copy, $1.1).
tb_log_to() {
    n=0
    while IFS= read -r line; do
        tb_say "$line"
        if [ -n "$1" ]; then
            echo "$line" >>"$1" 2>/dev/null
            n=$((n + 1))
            if [ $((n % 50)) -eq 1 ]; then
                size=$(wc -c <"$1" 2>/dev/null || echo 0)
                if [ "$size" -gt "$2" ]; then
                    mv -f "$1" "$1.1"
                fi
            fi
        fi
    done
}
