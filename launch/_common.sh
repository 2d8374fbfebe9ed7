# Shared by the launch scripts (sourced, not run). Why: one dry-run and quoting rule.
#
# run CMD...    executes CMD, or with DRY_RUN=1 prints it (shell-quoted, one line,
#               prefixed with "+ ") and executes nothing.
# quote ARGS... prints ARGS shell-quoted on one line, so a remote shell sees the same words.

DRY_RUN="${DRY_RUN:-0}"

quote() {
  local out="" a q="'"
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+="$a "
    else
      out+="$q${a//$q/$q\\$q$q}$q "
    fi
  done
  printf '%s' "${out% }"
}

run() {
  if [[ "$DRY_RUN" == "1" ]]; then
    printf '+ %s\n' "$(quote "$@")"
  else
    "$@"
  fi
}

die() { echo "error: $*" >&2; exit 2; }
