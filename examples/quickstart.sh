#!/usr/bin/env bash
# The main flow on the embedded default (local encrypted vault, no server), in a throwaway
# AGENTKEYS_HOME so it never touches ~/.agentkeys: init, store a secret, start the daemon, mint
# a scoped agent, act as that agent (fd delivery, a masked `run`, a refusal), show the audit
# trail and the hardening report, stop the daemon.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${AGENTKEYS_BIN:-$root/target/release}
[[ -x $bin/agentkeys && -x $bin/agentkeysd ]] || { echo "build first: cargo build --release" >&2; exit 2; }

demo=$(mktemp -d "${TMPDIR:-/tmp}/agentkeys-demo.XXXXXX")
export AGENTKEYS_HOME=$demo/home AGENTKEYS_SOCKET=$demo/run/agentkeysd.sock
unset AGENTKEYS_TOKEN AGENTKEYS_TOKEN_FILE
ak() { "$bin/agentkeys" "$@"; }
trap 'ak daemon stop >/dev/null 2>&1 || true' EXIT
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

step agentkeys init
ak init
step 'printf %s "$DEMO_TOKEN" | agentkeys store github'
printf %s "ghp_demo_$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')" | ak store github
step agentkeys list
ak list
step agentkeys daemon
ak daemon
step 'TOKEN=$(agentkeys agent add demo-agent --scope github --ttl 1h)'
token=$(ak agent add demo-agent --scope github --ttl 1h)
step 'AGENTKEYS_TOKEN=$TOKEN agentkeys whoami'
AGENTKEYS_TOKEN=$token ak whoami
step 'AGENTKEYS_TOKEN=$TOKEN agentkeys list'
AGENTKEYS_TOKEN=$token ak list
step 'AGENTKEYS_TOKEN=$TOKEN agentkeys read github | wc -c     # an fd, mapped, exact bytes'
AGENTKEYS_TOKEN=$token ak read github | wc -c
step "AGENTKEYS_TOKEN=\$TOKEN agentkeys run --env GH_TOKEN=github -- sh -c 'echo \"the child sees \$GH_TOKEN\"'"
AGENTKEYS_TOKEN=$token ak run --env GH_TOKEN=github -- sh -c 'echo "the child sees $GH_TOKEN"; printf %s "$GH_TOKEN" | base64'
step "AGENTKEYS_TOKEN=\$TOKEN agentkeys read openai    # outside the agent's scope"
AGENTKEYS_TOKEN=$token ak read openai || echo "(refused, exit $?)"
step 'agentkeys audit && agentkeys audit verify'
ak audit
ak audit verify
step agentkeys doctor
ak doctor
step agentkeys daemon stop
ak daemon stop
trap - EXIT
echo
echo "Demo state is in $demo (delete it when done)."
