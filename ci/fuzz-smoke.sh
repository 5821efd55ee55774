#!/usr/bin/env bash
# Fuzz smoke: builds every cargo-fuzz target in fuzz/ and runs each one for a short time
# (FUZZ_SMOKE_SECS, default 16 s) from the committed seed corpus, in a scratch corpus directory
# so the repository is not changed. Arguments name the targets to run (default: all).
# FUZZ_WORK_DIR keeps the grown corpora there instead of in a temporary directory (long runs:
# `FUZZ_SMOKE_SECS=600 FUZZ_WORK_DIR=/tmp/fuzz-work ci/fuzz-smoke.sh mask_stream`). Fails on any crash, leak, timeout or out-of-memory; the
# input that caused it is left in fuzz/artifacts/<target>/. Prints runs, exec/s and coverage
# per target. Long runs and the figures: fuzz/README.md.
#
# Works on the stable toolchain: the targets are built with `-s none` (libFuzzer's coverage
# instrumentation only, no sanitizer), which needs no unstable flag. AddressSanitizer would need
# `-Zsanitizer` (nightly, or RUSTC_BOOTSTRAP=1) and catches nothing more in code without
# `unsafe`, which is all the code these targets reach (see fuzz/README.md).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

secs=${FUZZ_SMOKE_SECS:-16}

if ! cargo fuzz --version >/dev/null 2>&1; then
	echo "== cargo install cargo-fuzz --locked"
	cargo install cargo-fuzz --locked
fi
# libFuzzer is C++, built by libfuzzer-sys.
if ! command -v c++ >/dev/null 2>&1; then
	echo "== apt-get install g++"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq g++ >/dev/null
fi

# cargo fuzz has no --locked: check that fuzz/Cargo.lock is up to date first.
cargo fetch --locked

echo "== cargo fuzz build -s none"
cargo fuzz build -s none

# The dictionary of each target, if it has one.
dict_of() {
	case $1 in
	decode_request) echo dict/wire.dict ;;
	config_parse) echo dict/config.dict ;;
	vault_parse) echo dict/vault.dict ;;
	audit_record) echo dict/audit.dict ;;
	backend_answer) echo dict/backend.dict ;;
	*) ;;
	esac
}

if [[ -n ${FUZZ_WORK_DIR:-} ]]; then
	mkdir -p "$FUZZ_WORK_DIR"
	scratch=$(cd "$FUZZ_WORK_DIR" && pwd)
else
	scratch=$(mktemp -d)
	trap 'rm -rf "$scratch"' EXIT
fi
targets=("$@")
((${#targets[@]})) || mapfile -t targets < <(cargo fuzz list)
failed=()
summary=()
for target in "${targets[@]}"; do
	echo "== fuzz $target for ${secs}s"
	mkdir -p "$scratch/$target" "artifacts/$target"
	args=(-max_total_time="$secs" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048
		-artifact_prefix="$PWD/artifacts/$target/")
	dict=$(dict_of "$target")
	[[ -n $dict ]] && args+=(-dict="$PWD/$dict")
	log="$scratch/$target.log"
	if cargo fuzz run -s none "$target" "$scratch/$target" "corpus/$target" -- "${args[@]}" \
		>"$log" 2>&1; then
		status=ok
	else
		status=FAILED
		failed+=("$target")
		# The report: the panic message, libFuzzer's verdict, the failing input's file.
		grep -E -A3 'panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer' "$log" | head -n 40 || true
		grep -E -A2 'Failing input:|Reproduce with:|Test unit written' "$log" || true
	fi
	runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
	rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
	cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[0-9]+[a-zA-Z]*' "$log" | tail -n 1 || true)
	line=$(printf '%-15s %-6s runs=%-9s exec/s=%-7s %s' "$target" "$status" "${runs:-?}" \
		"${rate:-?}" "${cov:-}")
	echo "$line"
	summary+=("$line")
done

echo "== fuzz smoke summary (${secs}s per target, stable, no sanitizer)"
printf '%s\n' "${summary[@]}"
if ((${#failed[@]})); then
	echo "fuzz smoke: crash in ${failed[*]} (inputs in fuzz/artifacts/)" >&2
	exit 1
fi
