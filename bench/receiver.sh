#!/usr/bin/env bash
# Receiver benchmark: the same synthetic MR study (default 2000 instances of 256x256 16-bit) sent
# with DCMTK storescu, on 1 association and on 4 parallel associations, to
#   - bidsflux-receiver (release build; nats-server with JetStream; durable before Success),
#   - DCMTK storescp (--fork for the 4-association case), at its best and with default options,
#   - Orthanc (Debian package; default configuration plus the sender's AE),
# all on 127.0.0.1, each with TCP_NODELAY=1 (DCMTK-based programs crawl without it). Every run
# starts its server on a fresh store, checks that every instance arrived, and stops it. Prints a
# markdown table (best of BENCH_REPEAT runs, median alongside).
#
#   bench/receiver.sh            (or: make bench)
#
# Environment: BENCH_SERIES (4) x BENCH_PER_SERIES (500) instances of BENCH_SIZE (256) square
# 16-bit images; BENCH_REPEAT (3) rounds; BENCH_DIR (/var/tmp) holds the temp work dir (same disk
# as a real spool, not tmpfs); BENCH_PEERS ("bidsflux storescp storescp_default orthanc":
# storescp is at its best, +B -pdu 131072; storescp_default as BIDS-flux ran it, default options);
# BENCH_BEFORE_BIN: path of another bidsflux-receiver build, added as peer bidsflux_before;
# BENCH_ASSOCS ("1 4"); BENCH_OUT: also write the table to this file.
# Only talks to 127.0.0.1. Everything it starts is stopped on exit (trap), the work dir removed.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SERIES=${BENCH_SERIES:-4}
PER_SERIES=${BENCH_PER_SERIES:-500}
SIZE=${BENCH_SIZE:-256}
REPEAT=${BENCH_REPEAT:-3}
PEERS=${BENCH_PEERS:-bidsflux storescp storescp_default orthanc}
ASSOCS=${BENCH_ASSOCS:-1 4}
N=$((SERIES * PER_SERIES))
if [ -n "${BENCH_BEFORE_BIN:-}" ] && [[ " $PEERS " != *" bidsflux_before "* ]]; then
    PEERS="$PEERS bidsflux_before"
fi
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}/release
STORESCU=/usr/bin/storescu
STORESCP=/usr/bin/storescp
ECHOSCU=/usr/bin/echoscu
NATS=$(command -v nats-server || echo /usr/sbin/nats-server)
ORTHANC=/usr/sbin/Orthanc

WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/bidsflux-bench.XXXXXX")
# Process groups of the servers started (a file: runs happen in command-substitution subshells).
PGIDS=$WORK/pgids
: >"$PGIDS"

log() { printf '%s\n' "$*" >&2; }
die() { log "bench: $*"; exit 1; }

# Stops the servers started so far (each runs under setsid: storescp --fork children too).
stop_all() {
    local g
    [ -f "$PGIDS" ] || return 0
    for g in $(cat "$PGIDS"); do
        kill -TERM -- "-$g" 2>/dev/null || true
    done
    for g in $(cat "$PGIDS"); do
        for _ in $(seq 50); do kill -0 -- "-$g" 2>/dev/null || break; sleep 0.1; done
        kill -KILL -- "-$g" 2>/dev/null || true
    done
    : >"$PGIDS"
}
cleanup() {
    stop_all
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Starts "$@" in its own session (process group), logging to $LOGFILE; records the group.
spawn() {
    setsid "$@" >>"$LOGFILE" 2>&1 </dev/null &
    echo "$!" >>"$PGIDS"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits until a DICOM server answers C-ECHO (called AE $2 on port $1).
wait_echo() {
    local i
    for i in $(seq 200); do
        if TCP_NODELAY=1 "$ECHOSCU" -aet SCANNER -aec "$2" 127.0.0.1 "$1" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    die "no C-ECHO answer on port $1 (see $LOGFILE)"
}

wait_port() {
    local i
    for i in $(seq 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    die "nothing listens on port $1"
}

now() { date +%s.%N; }

# Sends the study on $ASSOC associations to port $1 (called AE $2); prints the seconds it took.
send() {
    local port=$1 aec=$2 dirs=() pids=() rc=0 t0 t1 d
    if [ "$ASSOC" = 1 ]; then dirs=("$WORK/study"); else
        for d in $(seq "$ASSOC"); do dirs+=("$WORK/split$ASSOC/$d"); done
    fi
    t0=$(now)
    for d in "${dirs[@]}"; do
        TCP_NODELAY=1 "$STORESCU" -aet SCANNER -aec "$aec" 127.0.0.1 "$port" +sd "$d" \
            >>"$WORK/storescu.log" 2>&1 &
        pids+=("$!")
    done
    for d in "${pids[@]}"; do wait "$d" || rc=1; done
    t1=$(now)
    [ "$rc" = 0 ] || die "storescu failed (see $WORK/storescu.log): $(tail -5 "$WORK/storescu.log")"
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f\n", b - a }'
}

# A new directory per run, none removed before the end: on ext4, creating files where many were
# just deleted is much slower (the inode allocator skips recently freed inodes), which would
# penalise whichever peer runs after a cleanup.
new_run_dir() {
    mkdir -p "$WORK/runs"
    mktemp -d "$WORK/runs/run.XXXXXX"
}

count_files() { find "$1" -type f "${@:2}" | wc -l; }

# One run against each peer: fresh server and store, send, check, stop. Prints seconds.
run_bidsflux() {
    receiver "$TARGET/bidsflux-receiver"
}

# BENCH_BEFORE_BIN=path: another receiver build (e.g. an older commit's) as peer bidsflux_before.
run_bidsflux_before() {
    receiver "$BENCH_BEFORE_BIN"
}

receiver() {
    local bin=$1 d nats_port mon_port port secs stored
    d=$(new_run_dir); mkdir -p "$d/spool"
    LOGFILE=$d/server.log
    nats_port=$(free_port); mon_port=$(free_port); port=$(free_port)
    spawn "$NATS" -a 127.0.0.1 -p "$nats_port" -m "$mon_port" -js -sd "$d/nats"
    wait_port "$nats_port"
    NATS_URL=nats://127.0.0.1:$nats_port "$TARGET/bidsflux-provisioner" >>"$LOGFILE" 2>&1 ||
        die "provisioner failed (see $LOGFILE)"
    NATS_URL=nats://127.0.0.1:$nats_port BIDSFLUX_SPOOL_DIR=$d/spool BIDSFLUX_DICOM_BIND=127.0.0.1:$port \
        BIDSFLUX_AE_TITLE=BIDSFLUX BIDSFLUX_DICOM_ACCEPT_ANY=true BIDSFLUX_RECEIVER_HTTP_BIND=127.0.0.1:0 \
        spawn "$bin"
    wait_echo "$port" BIDSFLUX
    secs=$(send "$port" BIDSFLUX)
    stored=$(count_files "$d/spool" -name '*.dcm' -not -path '*/.tmp/*')
    [ "$stored" = "$N" ] || die "bidsflux spooled $stored of $N instances"
    stored=$(curl -sf "http://127.0.0.1:$mon_port/jsz" | python3 -c 'import json,sys; print(json.load(sys.stdin)["messages"])')
    [ "$stored" = "$N" ] || die "JetStream holds $stored of $N events"
    stop_all
    echo "$secs"
}

run_storescp() {
    local d port secs stored fork=()
    d=$(new_run_dir); mkdir -p "$d/out"
    LOGFILE=$d/server.log
    port=$(free_port)
    [ "$ASSOC" = 1 ] || fork=(--fork)
    # Its best here: bit-preserving (streams the data set to the file) and the largest PDU.
    TCP_NODELAY=1 spawn "$STORESCP" "${fork[@]}" +B -pdu 131072 -aet STORESCP -od "$d/out" "$port"
    wait_echo "$port" STORESCP
    secs=$(send "$port" STORESCP)
    stored=$(count_files "$d/out")
    [ "$stored" = "$N" ] || die "storescp stored $stored of $N instances"
    stop_all
    echo "$secs"
}

# storescp as BIDS-flux ran it: default options (16 KiB PDUs, data sets decoded and re-encoded).
run_storescp_default() {
    local d port secs stored fork=()
    d=$(new_run_dir); mkdir -p "$d/out"
    LOGFILE=$d/server.log
    port=$(free_port)
    [ "$ASSOC" = 1 ] || fork=(--fork)
    TCP_NODELAY=1 spawn "$STORESCP" "${fork[@]}" -aet STORESCP -od "$d/out" "$port"
    wait_echo "$port" STORESCP
    secs=$(send "$port" STORESCP)
    stored=$(count_files "$d/out")
    [ "$stored" = "$N" ] || die "storescp stored $stored of $N instances"
    stop_all
    echo "$secs"
}

run_orthanc() {
    local d port http secs stored
    d=$(new_run_dir); mkdir -p "$d/db" "$d/config"
    LOGFILE=$d/server.log
    port=$(free_port); http=$(free_port)
    # Orthanc merges the JSON files of a directory over its built-in defaults (the same values as
    # Debian's /etc/orthanc/orthanc.json): only the places, the ports and the sender's AE here.
    cat >"$d/config/orthanc.json" <<EOF
{
  "Name": "bench",
  "StorageDirectory": "$d/db",
  "IndexDirectory": "$d/db",
  "HttpPort": $http,
  "RemoteAccessAllowed": false,
  "DicomPort": $port,
  "DicomAet": "ORTHANC",
  "DicomAlwaysAllowStore": true,
  "DicomModalities": { "scanner": [ "SCANNER", "127.0.0.1", 104 ] }
}
EOF
    TCP_NODELAY=1 spawn "$ORTHANC" "$d/config"
    wait_echo "$port" ORTHANC
    secs=$(send "$port" ORTHANC)
    stored=$(curl -sf "http://127.0.0.1:$http/statistics" | python3 -c 'import json,sys; print(json.load(sys.stdin)["CountInstances"])')
    [ "$stored" = "$N" ] || die "Orthanc indexed $stored of $N instances"
    stop_all
    echo "$secs"
}

# ---- setup -------------------------------------------------------------------------------------
[ -x "$STORESCU" ] && [ -x "$STORESCP" ] && [ -x "$ECHOSCU" ] || die "DCMTK missing: apt-get install dcmtk"
[ -x "$NATS" ] || die "nats-server missing: apt-get install nats-server"
if [[ " $PEERS " == *" orthanc "* ]] && [ ! -x "$ORTHANC" ]; then
    log "installing Orthanc (Debian package)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq orthanc >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq orthanc >/dev/null; }
fi

LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
log "building release binaries"
(cd "$ROOT" && cargo build -q --release -p bidsflux-receiver -p bidsflux-provisioner \
    -p bidsflux-testsupport --bin bidsflux-receiver --bin bidsflux-provisioner --bin bidsflux-synth-study)

log "writing the study: $N instances of ${SIZE}x${SIZE} 16-bit MR"
"$TARGET/bidsflux-synth-study" "$WORK/study" "$SERIES" "$PER_SERIES" "$SIZE" >/dev/null
BYTES=$(find "$WORK/study" -type f -printf '%s\n' | awk '{ s += $1 } END { print s }')
for a in $ASSOCS; do
    [ "$a" = 1 ] && continue
    # Round-robin split into $a directories (hard links), one storescu per directory.
    i=0
    for f in "$WORK"/study/*.dcm; do
        mkdir -p "$WORK/split$a/$((i % a + 1))"
        ln "$f" "$WORK/split$a/$((i % a + 1))/"
        i=$((i + 1))
    done
done

# ---- runs ----------------------------------------------------------------------------------------
# Rounds interleave the peers (bidsflux, storescp, ..., bidsflux, storescp, ...) so that whatever
# else the machine does falls on all of them alike; the best and the median of the rounds count.
declare -A TIMES BEST MEDIAN
for ASSOC in $ASSOCS; do
    for r in $(seq "$REPEAT"); do
        for peer in $PEERS; do
            s=$("run_$peer")
            log "$peer, $ASSOC association(s), round $r: ${s}s ($(awk -v n="$N" -v s="$s" 'BEGIN { printf "%.0f", n / s }') instances/s)"
            TIMES[$peer,$ASSOC]="${TIMES[$peer,$ASSOC]:-} $s"
        done
    done
    for peer in $PEERS; do
        sorted=$(printf '%s\n' ${TIMES[$peer,$ASSOC]} | sort -g)
        BEST[$peer,$ASSOC]=$(head -1 <<<"$sorted")
        MEDIAN[$peer,$ASSOC]=$(sed -n "$(((REPEAT + 1) / 2))p" <<<"$sorted")
    done
done

# ---- report --------------------------------------------------------------------------------------
rate() { awk -v n="$1" -v s="$2" 'BEGIN { printf "%.0f", n / s }'; }
mbs() { awk -v b="$BYTES" -v s="$1" 'BEGIN { printf "%.1f", b / s / 1e6 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b / a }'; }
{
    echo "Study: $N instances of ${SIZE}x${SIZE} 16-bit MR, $(awk -v b="$BYTES" 'BEGIN { printf "%.1f", b / 1e6 }') MB; DCMTK storescu, TCP_NODELAY=1; best of $REPEAT rounds (median in brackets); $(nproc) cores, $(uname -sr); load average before/after: $LOAD0 / $(cut -d' ' -f1-3 /proc/loadavg)."
    echo
    echo "| peer | associations | instances/s | MB/s | bidsflux ÷ peer |"
    echo "|---|---|---|---|---|"
    for ASSOC in $ASSOCS; do
        for peer in $PEERS; do
            b=${BEST[$peer,$ASSOC]}; m=${MEDIAN[$peer,$ASSOC]}
            r="—"
            if [ "$peer" != bidsflux ] && [ -n "${BEST[bidsflux,$ASSOC]:-}" ]; then
                r="$(ratio "${BEST[bidsflux,$ASSOC]}" "$b") ($(ratio "${MEDIAN[bidsflux,$ASSOC]}" "$m"))"
            fi
            echo "| $peer | $ASSOC | $(rate "$N" "$b") ($(rate "$N" "$m")) | $(mbs "$b") ($(mbs "$m")) | $r |"
        done
    done
} | tee "${BENCH_OUT:-/dev/null}"
