#!/usr/bin/env bash
# Delivery benchmark, one command from a fresh clone:
#
#   bash bench/run.sh
#
# Builds release, sets up a throwaway AGENTKEYS_HOME with two 40-byte random secrets
# (bench-uncached; bench-cached with --cache-ttl 10m), starts agentkeysd in the foreground,
# mints an agent scoped to both, runs target/release/examples/bench_delivery as that agent
# (latency, baselines, 8-client throughput), times `agentkeys run`, stops the daemon; then
# measures start-up and idle RSS (bench_delivery --startup), the daemon's RSS with 10,000
# cached secrets (bench_state seed + bench_delivery --fill-cache), a 100,000-entry vault lookup
# and audit group-commit throughput (bench_state vault / audit), an uncached read through a
# remote daemon over loopback TLS against a local one (remote_read_over_local), and the
# credential-injecting proxy against a local HTTPS server (bench_proxy: keep-alive p50, 8
# clients, handshakes, direct vs proxied; its requests client comes from .venv-proxy, made here
# with pip when missing). The last line of stdout is one JSON object of numbers.
#
# Environment:
#   BENCH_ITERS / BENCH_WARMUP   timed / warm-up iterations per measurement (2000 / 200)
#   BENCH_PROFILE=strace         attach `strace -c -w -f` to the daemon for the measured run
#   BENCH_PROFILE=perf           attach `perf stat` (software events) to the daemon instead
#   BENCH_PROFILE=perf-record    sample the daemon on cpu-clock with call graphs and print the
#                                hottest kernel/user symbols (the release binaries are stripped,
#                                so user frames show as addresses in agentkeysd)
#                                (profiled figures are inflated; profiles go to stderr)
#   BENCH_KEEP=1                 keep the temporary directory (daemon log, audit log)
#   BENCH_CLIENTS / BENCH_TPUT_SECS   throughput clients / seconds (8 / 3)
#   BENCH_CACHED_N               secrets cached for rss_kib_10k_cached (10000)
#   BENCH_VAULT_N                entries of the lookup vault (100000)
#   BENCH_REMOTE_ITERS           timed iterations of the remote-vs-local read (500)
#   BENCH_PROXY_ITERS            keep-alive GETs per proxy latency measurement (2000)
#   BENCH_PROXY_CACHE_TTL        the proxied service's --cache-ttl (10m; 0s: a page per request)
# Progress, build output and profiles go to stderr; stdout is the report only.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

# The proxy's headline figures are timed with Python's `requests` (what most agent tools are),
# from a venv of its own, set up here as .ci/run does when a fresh clone has none yet.
if ! .venv-proxy/bin/python -c 'import requests' >/dev/null 2>&1; then
    if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
        echo "bench: apt-get install python3 python3-venv" >&2
        apt-get update -qq >&2 && apt-get install -y -qq python3 python3-venv >&2
    fi
    echo "bench: python3 -m venv .venv-proxy && pip install requests httpx" >&2
    python3 -m venv .venv-proxy >&2 && .venv-proxy/bin/pip install -q requests httpx >&2 ||
        echo "bench: no venv with requests (the proxy's requests figures will be missing)" >&2
fi

echo "bench: cargo build --release --bins --examples" >&2
cargo build --release --bins --examples >&2
bin=${CARGO_TARGET_DIR:-$root/target}/release
bench_exe=$bin/examples/bench_delivery
state_exe=$bin/examples/bench_state
proxy_exe=$bin/examples/bench_proxy
for f in "$bin/agentkeys" "$bin/agentkeysd" "$bench_exe" "$state_exe" "$proxy_exe"; do
    [[ -x $f ]] || { echo "bench: $f was not built" >&2; exit 2; }
done

dir=$(mktemp -d "${TMPDIR:-/tmp}/agentkeys-bench.XXXXXX")
export AGENTKEYS_HOME=$dir/home AGENTKEYS_SOCKET=$dir/run/agentkeysd.sock
unset AGENTKEYS_TOKEN AGENTKEYS_TOKEN_FILE AGENTKEYS_LOG
daemon_pid=
profiler_pid=
remote_pid=

ak() { "$bin/agentkeys" "$@"; }

cleanup() {
    local rc=$?
    if [[ -n $remote_pid ]] && kill -0 "$remote_pid" 2>/dev/null; then
        kill "$remote_pid" 2>/dev/null || true
        wait "$remote_pid" 2>/dev/null || true
    fi
    if [[ -n $profiler_pid ]] && kill -0 "$profiler_pid" 2>/dev/null; then
        kill -INT "$profiler_pid" 2>/dev/null || true
        wait "$profiler_pid" 2>/dev/null || true
    fi
    if [[ -n $daemon_pid ]] && kill -0 "$daemon_pid" 2>/dev/null; then
        ak daemon stop >/dev/null 2>&1 || true
        for _ in $(seq 50); do
            kill -0 "$daemon_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill "$daemon_pid" 2>/dev/null || true
        wait "$daemon_pid" 2>/dev/null || true
    fi
    if [[ -n ${BENCH_KEEP:-} ]]; then
        echo "bench: kept $dir" >&2
    else
        rm -rf "$dir"
    fi
    exit "$rc"
}
trap cleanup EXIT

# 30 random bytes -> exactly 40 base64 characters; piped, never on a command line.
secret() { head -c 30 /dev/urandom | base64 -w0; }

echo "bench: state in $dir" >&2
ak init >/dev/null
secret | ak store bench-uncached >/dev/null
secret | ak store bench-cached --cache-ttl 10m >/dev/null

"$bin/agentkeysd" --foreground >"$dir/agentkeysd.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 200); do
    if ak status >/dev/null 2>&1; then
        break
    fi
    if ! kill -0 "$daemon_pid" 2>/dev/null; then
        echo "bench: agentkeysd exited during start; its log:" >&2
        cat "$dir/agentkeysd.log" >&2
        exit 1
    fi
    sleep 0.1
done
if ! ak status >/dev/null 2>&1; then
    echo "bench: agentkeysd did not answer within 20 s; its log:" >&2
    cat "$dir/agentkeysd.log" >&2
    exit 1
fi

token=$(ak agent add bench --scope bench-uncached,bench-cached | tail -n 1)
[[ $token == akt_* ]] || { echo "bench: agent add printed no token" >&2; exit 1; }

case ${BENCH_PROFILE:-} in
    "") ;;
    strace)
        strace -c -w -f -p "$daemon_pid" -o "$dir/profile.txt" 2>/dev/null &
        profiler_pid=$!
        sleep 0.5
        ;;
    perf)
        perf stat -e task-clock,context-switches,cpu-migrations,page-faults \
            -p "$daemon_pid" -o "$dir/profile.txt" &
        profiler_pid=$!
        sleep 0.5
        ;;
    perf-record)
        perf record -q -e cpu-clock -F 4999 -g -p "$daemon_pid" -o "$dir/perf.data" 2>/dev/null &
        profiler_pid=$!
        sleep 0.5
        ;;
    *) echo "bench: unknown BENCH_PROFILE=${BENCH_PROFILE} (strace, perf or perf-record)" >&2; exit 2 ;;
esac

AGENTKEYS_TOKEN=$token "$bench_exe" --sync-dir "$AGENTKEYS_HOME" >"$dir/report.txt"

if [[ -n $profiler_pid ]]; then
    kill -INT "$profiler_pid" 2>/dev/null || true
    wait "$profiler_pid" 2>/dev/null || true
    profiler_pid=
    echo "bench: daemon profile (${BENCH_PROFILE}) during the run:" >&2
    if [[ $BENCH_PROFILE == perf-record ]]; then
        perf report -i "$dir/perf.data" --stdio --no-children --percent-limit 1 \
            --sort dso,sym -g none 2>/dev/null | grep -v '^$' >&2 || true
    else
        cat "$dir/profile.txt" >&2
    fi
fi

# `agentkeys run` against the program alone: whole processes, medians, interleaved so both see
# the same machine. run: CLI -> daemon -> fetch + audit -> launcher -> fork/exec -> exit back.
runs=${BENCH_RUN_ITERS:-40}
ns() { date +%s%N; }
: >"$dir/run.ms"
: >"$dir/env.ms"
for _ in $(seq "$runs"); do
    t0=$(ns)
    ak run --env T=bench-uncached -- /bin/true
    t1=$(ns)
    /usr/bin/env T=x /bin/true
    t2=$(ns)
    echo "$(( (t1 - t0) / 1000 ))" >>"$dir/run.ms"
    echo "$(( (t2 - t1) / 1000 ))" >>"$dir/env.ms"
done
median() { sort -n "$1" | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
run_us=$(median "$dir/run.ms")
env_us=$(median "$dir/env.ms")
ratio=$(awk -v a="$run_us" -v b="$env_us" 'BEGIN {printf "%.2f", a / b}')

# `agentkeys jail --agent x -- /bin/true` (whole process: policy, kernel check, session from
# the daemon, namespaces, mounts, Landlock, seccomp, exec, jail_exit) against bubblewrap doing
# the same with user, mount and PID namespaces (else util-linux unshare), interleaved, medians.
jails=${BENCH_JAIL_ITERS:-20}
ak agent add benchjail --scope bench-uncached >/dev/null
jail_dir=$dir/jail-cwd
mkdir -p "$jail_dir"
if command -v bwrap >/dev/null; then
    jail_base_name=bwrap
    jail_base() { bwrap --unshare-user --unshare-pid --unshare-ipc --ro-bind / / --dev /dev --proc /proc --tmpfs /tmp --bind "$jail_dir" "$jail_dir" /bin/true; }
else
    jail_base_name=unshare
    jail_base() { unshare -U -m -p -i -f --mount-proc /bin/true; }
fi
: >"$dir/jail.ms"
: >"$dir/jailbase.ms"
jail_ok=1
for _ in $(seq "$jails"); do
    t0=$(ns)
    (cd "$jail_dir" && ak jail --agent benchjail -- /bin/true 2>/dev/null) || jail_ok=0
    t1=$(ns)
    jail_base || jail_ok=0
    t2=$(ns)
    echo "$(( (t1 - t0) / 1000 ))" >>"$dir/jail.ms"
    echo "$(( (t2 - t1) / 1000 ))" >>"$dir/jailbase.ms"
done
jail_ms=$(awk -v u="$(median "$dir/jail.ms")" 'BEGIN {printf "%.2f", u / 1000}')
jailbase_ms=$(awk -v u="$(median "$dir/jailbase.ms")" 'BEGIN {printf "%.2f", u / 1000}')
jail_ratio=$(awk -v a="$jail_ms" -v b="$jailbase_ms" 'BEGIN {printf "%.2f", a / b}')
[[ $jail_ok == 1 ]] || echo "bench: a jail start failed (the figures include the failure)" >&2

stop_daemon() {
    ak daemon stop >/dev/null
    for _ in $(seq 100); do
        kill -0 "$daemon_pid" 2>/dev/null || break
        sleep 0.1
    done
    wait "$daemon_pid" 2>/dev/null || true
    daemon_pid=
}
start_daemon() {
    "$bin/agentkeysd" --foreground >>"$dir/agentkeysd.log" 2>&1 &
    daemon_pid=$!
    for _ in $(seq 300); do
        ak status >/dev/null 2>&1 && return 0
        kill -0 "$daemon_pid" 2>/dev/null || break
        sleep 0.1
    done
    echo "bench: agentkeysd did not start; its log:" >&2
    cat "$dir/agentkeysd.log" >&2
    exit 1
}
stop_daemon

# Remote agents (issue 17): an uncached read through a second daemon whose service comes from
# this one over loopback TLS (`kind = "agentkeys"`), against the same read from this daemon
# directly, alternating, in one process.
echo "bench: remote daemon over loopback TLS" >&2
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf '[daemon]\nlisten = ["tls://127.0.0.1:%s"]\n' "$port" >"$AGENTKEYS_HOME/config.toml"
chmod 600 "$AGENTKEYS_HOME/config.toml"
start_daemon
ak agent add bench-remote --scope bench-uncached --remote --out "$dir/remote.token" >/dev/null 2>&1
fingerprint=$(ak remote info --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["fingerprint"])')
rhome=$dir/rhome rsock=$dir/rrun/agentkeysd.sock
AGENTKEYS_HOME=$rhome AGENTKEYS_SOCKET=$rsock ak init >/dev/null
cat >"$rhome/config.toml" <<TOML
[backends.owner]
kind = "agentkeys"
address = "tls://127.0.0.1:$port"
fingerprint = "$fingerprint"
token_file = "$dir/remote.token"

[services.bench-uncached]
backend = "owner"
TOML
chmod 600 "$rhome/config.toml"
AGENTKEYS_HOME=$rhome AGENTKEYS_SOCKET=$rsock "$bin/agentkeysd" --foreground >"$dir/remote.log" 2>&1 &
remote_pid=$!
for _ in $(seq 200); do
    AGENTKEYS_HOME=$rhome AGENTKEYS_SOCKET=$rsock ak status >/dev/null 2>&1 && break
    sleep 0.1
done
rtoken=$(AGENTKEYS_HOME=$rhome AGENTKEYS_SOCKET=$rsock ak agent add rbench --scope bench-uncached | tail -n 1)
[[ $rtoken == akt_* ]] || { echo "bench: remote agent add printed no token" >&2; exit 1; }
AGENTKEYS_TOKEN=$token BENCH_REMOTE_TOKEN=$rtoken \
    "$bench_exe" --remote-vs-local "$rsock" --iters "${BENCH_REMOTE_ITERS:-500}" --warmup 50 >"$dir/remote.txt"
unset rtoken
AGENTKEYS_HOME=$rhome AGENTKEYS_SOCKET=$rsock ak daemon stop >/dev/null 2>&1 || true
wait "$remote_pid" 2>/dev/null || true
remote_pid=
stop_daemon
rm -f "$AGENTKEYS_HOME/config.toml"

# Start-up time and idle RSS: the daemon started fresh several times, as the agent (no daemon
# running in between).
echo "bench: start-up and idle RSS" >&2
AGENTKEYS_TOKEN=$token "$bench_exe" --startup "$bin/agentkeysd" >"$dir/startup.txt"

# 10,000 cached secrets: seeded in one vault write, each fetched once (cached for 10 min), then
# all fetched again; the second pass's cache_hit records say how many stayed cached.
cached_n=${BENCH_CACHED_N:-10000}
echo "bench: $cached_n cached secrets" >&2
"$state_exe" seed --count "$cached_n" --prefix c --cache-ttl 600
start_daemon
token10k=$(ak agent add bench10k --scope '*' | tail -n 1)
[[ $token10k == akt_* ]] || { echo "bench: agent add printed no token" >&2; exit 1; }
hits_before=$(grep -c '"event":"cache_hit"' "$AGENTKEYS_HOME/audit.jsonl" || true)
AGENTKEYS_TOKEN=$token10k "$bench_exe" --fill-cache c "$cached_n" >"$dir/fill.txt"
unset token10k
hits=$(( $(grep -c '"event":"cache_hit"' "$AGENTKEYS_HOME/audit.jsonl" || true) - hits_before ))
read -r rss_10k lck_10k < <(awk '/^VmRSS:/ {r=$2} /^VmLck:/ {l=$2} END {print r+0, l+0}' "/proc/$daemon_pid/status")
memlock_kib=$(( $(ulimit -l 2>/dev/null | sed 's/unlimited/0/') + 0 ))
stop_daemon
unset token

echo "bench: vault of ${BENCH_VAULT_N:-100000} entries, audit group commit" >&2
"$state_exe" vault --dir "$dir" --entries "${BENCH_VAULT_N:-100000}" >"$dir/vault.txt"
"$state_exe" audit --dir "$dir" >"$dir/audit.txt"

# The credential-injecting proxy: its own home, daemon and local HTTPS server (bench_proxy
# sets them up), the same client direct and through the proxy with the value injected.
echo "bench: credential-injecting proxy" >&2
"$proxy_exe" "$bin" >"$dir/proxy.txt"

# The example's report, with the run figures added to its final JSON line.
head -n -1 "$dir/report.txt"
cat <<TXT
agentkeys run vs. the program alone ($runs runs each, medians of whole processes):
  agentkeys run --env T=svc -- /bin/true   ${run_us} us
  /usr/bin/env T=x /bin/true               ${env_us} us
  run_overhead_ratio                       ${ratio}
TXT
head -n -1 "$dir/remote.txt"
cat <<TXT
agentkeys jail vs. $jail_base_name ($jails runs each, medians of whole processes):
  agentkeys jail --agent x -- /bin/true    ${jail_ms} ms
  $jail_base_name (user, mount, PID namespaces)   ${jailbase_ms} ms
  jail_start_ratio                         ${jail_ratio}
TXT
head -n -1 "$dir/startup.txt"
head -n -1 "$dir/vault.txt"
head -n -1 "$dir/audit.txt"
head -n -1 "$dir/proxy.txt"
cat <<TXT
daemon memory with $cached_n cached secrets (each fetched once, then all again):
  cached (cache_hit on the second pass)      ${hits} of ${cached_n}
  VmRSS                                      ${rss_10k} KiB
  VmLck (locked secret pages, DEK included)  ${lck_10k} KiB (RLIMIT_MEMLOCK here: ${memlock_kib} KiB)
TXT
# One JSON object: the example's line, plus the run figures and the other parts' lines.
body() { tail -n 1 "$1" | sed 's/^{//; s/}$//'; }
echo "{$(body "$dir/report.txt"),\"run_p50_us\":${run_us},\"env_true_p50_us\":${env_us},\"run_overhead_ratio\":${ratio},\"jail_start_ms\":${jail_ms},\"jail_baseline_ms\":${jailbase_ms},\"jail_baseline\":\"${jail_base_name}\",\"jail_start_ratio\":${jail_ratio},$(body "$dir/remote.txt"),$(body "$dir/startup.txt"),\"rss_kib_10k_cached\":${rss_10k},\"vmlck_kib_10k_cached\":${lck_10k},\"cached_secrets\":${hits},\"cached_secrets_wanted\":${cached_n},$(body "$dir/fill.txt"),$(body "$dir/vault.txt"),$(body "$dir/audit.txt"),$(body "$dir/proxy.txt")}"
