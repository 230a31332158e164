#!/usr/bin/env bash
# Run a command with the local stack up; stop the stack afterwards if this script started it.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
started=0
status=$("$here/stack.sh" status)
if [[ "$status" != *"kafka: up"* || "$status" != *"redis: up"* ]]; then
  "$here/stack.sh" up || exit 1
  started=1
fi
"$@"
rc=$?
if [ "$started" = 1 ] && [ -z "${KEEP_STACK:-}" ]; then "$here/stack.sh" down; fi
exit $rc
