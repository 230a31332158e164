#!/usr/bin/env bash
# helm from the Go module proxy, built once (minutes on 2 cores) into HELM_DIR (default
# GOPATH/opt/helm-VERSION, outside the work tree, so fresh clones on this machine reuse it).
# Prints the binary's path. Needs Go >= 1.24 on the PATH (or in /usr/local/go/bin).
set -euo pipefail
version=v3.22.0
PATH=$PATH:/usr/local/go/bin
command -v go >/dev/null 2>&1 || { echo "[helm] Go is needed to build helm" >&2; exit 2; }
dir=${HELM_DIR:-$(go env GOPATH)/opt/helm-$version}
helm=$dir/helm
stamp=$dir/.complete
if [ -x "$helm" ] && [ -f "$stamp" ]; then echo "$helm"; exit 0; fi
mkdir -p "$dir"
echo "[helm] go install helm.sh/helm/v3/cmd/helm@$version (once; cached in $dir)" >&2
start=$(date +%s)
GOBIN=$dir go install "helm.sh/helm/v3/cmd/helm@$version" >&2
echo "[helm] built in $(($(date +%s) - start)) s" >&2
touch "$stamp"
echo "$helm"
