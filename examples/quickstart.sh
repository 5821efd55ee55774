#!/usr/bin/env bash
# The main flow on the embedded default (local encrypted vault, no server), in a throwaway
# AGENTKEYS_HOME so it never touches ~/.agentkeys: init, store a secret, start the daemon, mint
# a scoped agent, act as that agent (fd delivery, a masked `run`, a refusal), show the audit
# trail and the hardening report, stop the daemon.
#
# Every step prints a command and then runs exactly that text (`step` evaluates the string it
# shows), so what you read is what ran.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${AGENTKEYS_BIN:-$root/target/release}
[[ -x $bin/agentkeys && -x $bin/agentkeysd ]] || { echo "build first: cargo build --release" >&2; exit 2; }

demo=$(mktemp -d "${TMPDIR:-/tmp}/agentkeys-demo.XXXXXX")
export AGENTKEYS_HOME=$demo/home AGENTKEYS_SOCKET=$demo/run/agentkeysd.sock
unset AGENTKEYS_TOKEN AGENTKEYS_TOKEN_FILE
# `agentkeys` in the commands below is the binary just built.
agentkeys() { "$bin/agentkeys" "$@"; }
trap 'agentkeys daemon stop >/dev/null 2>&1 || true' EXIT
# Shows a command, then runs that very text.
step() {
	printf '\n\033[1m$ %s\033[0m\n' "$1"
	eval "$1"
}

# A made-up token for the demo (random, so nothing real is ever shown).
DEMO_TOKEN="ghp_demo_$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
step 'agentkeys init'
step 'printf %s "$DEMO_TOKEN" | agentkeys store github'
step 'agentkeys list'
step 'agentkeys daemon'
step 'TOKEN=$(agentkeys agent add demo-agent --scope github --ttl 1h)'
step 'AGENTKEYS_TOKEN=$TOKEN agentkeys whoami'
step 'AGENTKEYS_TOKEN=$TOKEN agentkeys list'
# An fd, mapped, exact bytes: only their count is shown here.
step 'AGENTKEYS_TOKEN=$TOKEN agentkeys read github | wc -c'
# The child has the secret; what it prints comes back masked, its base64 too.
step 'AGENTKEYS_TOKEN=$TOKEN agentkeys run --env GH_TOKEN=github -- sh -c '\''echo "the child sees $GH_TOKEN"; printf %s "$GH_TOKEN" | base64'\'''
# Outside the agent's scope: refused, and audited.
step 'AGENTKEYS_TOKEN=$TOKEN agentkeys read openai || echo "(refused, exit $?)"'
step 'agentkeys audit'
step 'agentkeys audit verify'
step 'agentkeys doctor'
step 'agentkeys daemon stop'
trap - EXIT
echo
echo "Demo state is in $demo (delete it when done)."
