#!/usr/bin/env bash
# ci/checksec.sh BIN... — release-binary hardening gate.
#
# For every ELF binary given, checks with `readelf` alone (binutils, nothing else):
#   PIE     ELF type DYN plus DT_FLAGS_1 PIE, or type DYN with a PT_INTERP (older linkers
#           do not set the PIE flag). A shared object (DYN, no PIE flag, no interpreter) is
#           reported as "dso" and passes: it is position-independent and loaded at a random
#           address, which is what this check is about, and it keeps the gate usable on a
#           cdylib client library. Type EXEC (or REL, CORE, ...) fails.
#   RELRO   "full" needs a PT_GNU_RELRO segment AND immediate binding (DT_BIND_NOW, DT_FLAGS
#           with BIND_NOW, or DT_FLAGS_1 with NOW). GNU_RELRO alone is "partial" and fails.
#   CANARY  a __stack_chk_fail / __stack_chk_guard / __intel_security_cookie symbol in .dynsym
#           or .symtab (release binaries are stripped, so .dynsym is what usually counts).
#   NX      a PT_GNU_STACK segment without the E flag. No GNU_STACK at all fails: the kernel
#           then may give the process an executable stack.
#   FORTIFY reported only, never required: the number of distinct __*_chk functions found.
#
# Exit status: 0 every binary has PIE, full RELRO, CANARY and NX; 1 at least one does not
# (each failure is named); 2 usage error, readelf missing, or an argument that is not a
# readable ELF file.
set -euo pipefail

export LC_ALL=C
prog=${0##*/}

usage() {
	echo "usage: $prog BIN..." >&2
	echo "  checks each ELF binary for PIE, full RELRO, stack canary and NX (and reports FORTIFY)" >&2
	echo "  exit 0: all pass; 1: a required property is missing; 2: usage or input error" >&2
}

die() {
	echo "$prog: error: $*" >&2
	exit 2
}

if [[ $# -eq 0 ]]; then
	usage
	exit 2
fi
case "$1" in
-h | --help)
	usage
	exit 2
	;;
esac

command -v readelf >/dev/null 2>&1 || die "readelf not found in PATH (install binutils)"

# readelf_or_die FILE ARGS...: run readelf, exit 2 with its message if it fails.
readelf_or_die() {
	local file=$1 out
	shift
	if ! out=$(readelf "$@" -- "$file" 2>&1); then
		die "readelf $* failed on '$file': ${out:-no output}"
	fi
	printf '%s\n' "$out"
}

# has_word "WORDS" WORD: true if WORD is one of the whitespace-separated WORDS.
has_word() {
	local w
	for w in $1; do
		[[ $w == "$2" ]] && return 0
	done
	return 1
}

# Validate every argument before printing anything, so input errors are not mixed into the table.
for f in "$@"; do
	[[ -e $f ]] || die "'$f': no such file"
	[[ -f $f ]] || die "'$f': not a regular file"
	[[ -r $f ]] || die "'$f': not readable"
	if ! hdr=$(readelf -h -- "$f" 2>&1); then
		die "'$f': not an ELF file (${hdr##*Error: })"
	fi
	n=$(grep -c '^ELF Header:' <<<"$hdr" || true)
	[[ $n -eq 1 ]] || die "'$f': not a single ELF file (archive?)"
done

# Results, indexed like the arguments.
declare -a R_PIE R_RELRO R_CANARY R_NX R_FORTIFY
failures=()

i=0
for f in "$@"; do
	hdr=$(readelf_or_die "$f" -W -h)
	phdrs=$(readelf_or_die "$f" -W -l)
	dyn=$(readelf_or_die "$f" -W -d)
	syms=$(readelf_or_die "$f" -W -s)

	etype=$(awk '$1 == "Type:" { print $2; exit }' <<<"$hdr")

	# DT_FLAGS_1 / DT_FLAGS words, e.g. "(FLAGS_1)   Flags: NOW PIE" and "(FLAGS)   BIND_NOW".
	flags1=$(awk '/\(FLAGS_1\)/ { sub(/.*\(FLAGS_1\)[[:space:]]*/, ""); sub(/^Flags:/, ""); print }' <<<"$dyn")
	flags=$(awk '/\(FLAGS\)/ { sub(/.*\(FLAGS\)[[:space:]]*/, ""); print }' <<<"$dyn")

	has_interp=no
	if awk '$1 == "INTERP" { found = 1 } END { exit !found }' <<<"$phdrs"; then
		has_interp=yes
	fi

	# --- PIE
	if [[ $etype == DYN ]]; then
		if has_word "$flags1" PIE || [[ $has_interp == yes ]]; then
			pie=yes
		else
			pie=dso
		fi
	else
		pie=no
		failures+=("$f: PIE: ELF type ${etype:-unknown}, not a position-independent executable")
	fi

	# --- RELRO
	has_relro=no
	if awk '$1 == "GNU_RELRO" { found = 1 } END { exit !found }' <<<"$phdrs"; then
		has_relro=yes
	fi
	bind_now=no
	if grep -q '(BIND_NOW)' <<<"$dyn" || has_word "$flags" BIND_NOW || has_word "$flags1" NOW; then
		bind_now=yes
	fi
	if [[ $has_relro == yes && $bind_now == yes ]]; then
		relro=full
	elif [[ $has_relro == yes ]]; then
		relro=partial
		failures+=("$f: RELRO: partial (GNU_RELRO present, but no BIND_NOW: GOT stays writable)")
	else
		relro=no
		failures+=("$f: RELRO: no GNU_RELRO segment")
	fi

	# --- NX: flags are the fields between MemSiz ($6) and Align ($NF); "R E" spans two fields.
	stack_flags=$(awk '$1 == "GNU_STACK" { s = ""; for (j = 7; j < NF; j++) s = s $j; print s; exit }' <<<"$phdrs")
	if [[ -z $stack_flags ]]; then
		nx=no
		failures+=("$f: NX: no GNU_STACK program header (stack may be executable)")
	elif [[ $stack_flags == *E* ]]; then
		nx=no
		failures+=("$f: NX: GNU_STACK is executable (flags $stack_flags)")
	else
		nx=yes
	fi

	# --- CANARY: symbol name is field 8 of `readelf -W -s`, possibly with an @VERSION suffix.
	if awk '$8 ~ /^(__stack_chk_fail|__stack_chk_fail_local|__stack_chk_guard|__intel_security_cookie)(@|$)/ { found = 1 }
		END { exit !found }' <<<"$syms"; then
		canary=yes
	else
		canary=no
		failures+=("$f: CANARY: no __stack_chk_fail/__stack_chk_guard symbol (built without a stack protector)")
	fi

	# --- FORTIFY (report only): distinct __*_chk functions, e.g. __memcpy_chk, __printf_chk.
	nchk=$(awk '$4 == "FUNC" && $8 ~ /^__[A-Za-z0-9_]+_chk(@|$)/ { sub(/@.*/, "", $8); print $8 }' <<<"$syms" |
		sort -u | wc -l)
	nchk=${nchk//[[:space:]]/}
	if [[ $nchk -gt 0 ]]; then
		fortify="yes ($nchk fortified calls)"
	else
		fortify=no
	fi

	R_PIE[i]=$pie
	R_RELRO[i]=$relro
	R_CANARY[i]=$canary
	R_NX[i]=$nx
	R_FORTIFY[i]=$fortify
	i=$((i + 1))
done

# --- table
w=6
for f in "$@"; do
	((${#f} > w)) && w=${#f}
done
fmt="%-${w}s  %-4s  %-7s  %-6s  %-3s  %s\n"
# shellcheck disable=SC2059 # the format string is built above on purpose
printf "$fmt" BINARY PIE RELRO CANARY NX FORTIFY
i=0
for f in "$@"; do
	# shellcheck disable=SC2059
	printf "$fmt" "$f" "${R_PIE[i]}" "${R_RELRO[i]}" "${R_CANARY[i]}" "${R_NX[i]}" "${R_FORTIFY[i]}"
	i=$((i + 1))
done

if [[ ${#failures[@]} -gt 0 ]]; then
	echo
	for msg in "${failures[@]}"; do
		echo "FAIL: $msg"
	done
	echo "$prog: hardening gate FAILED (${#failures[@]} failed check(s); required: PIE, full RELRO, CANARY, NX)"
	exit 1
fi
echo
echo "$prog: hardening gate passed for $# binary(ies) (PIE, full RELRO, CANARY, NX)"
exit 0
