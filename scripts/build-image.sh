#!/usr/bin/env bash
# Builds the tandem image from the repository's Dockerfile with docker, podman or buildah,
# optionally from wheels prepared on the host, and optionally loads it into kind or minikube.
# Exit codes: 0 built, 1 the build (or the engine) failed, 2 bad arguments. docs/image.md.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEEL_DIR="$REPO/build/wheels"   # the Dockerfile reads host wheels from here (build/wheels)

usage() {
  cat <<'EOF'
usage: scripts/build-image.sh [options] [-- ENGINE_BUILD_ARGS...]

Builds the tandem image from the repository's Dockerfile (context: the repository).

options:
  --engine docker|podman|buildah  container engine (default: the first one found, in that order)
  --tag IMAGE                     image name (default: localhost/tandem:VERSION from pyproject.toml)
  --base IMAGE                    base image, any Debian bookworm (default: the Dockerfile's,
                                  debian:bookworm-slim)
  --wheels index|host             where pip gets the dependencies (default: index). host: build
                                  them here first with PYTHON's pip into build/wheels/ and
                                  install them in the build with --no-index (for builds that
                                  cannot reach an index). PYTHON must be the image's
                                  Python version (3.11 for bookworm).
  --extras LIST                   optional dependency groups of pyproject.toml to install,
                                  comma-separated (default: kubernetes, for the controller's
                                  node-down responder; "" for none)
  --python PATH                   the Python that builds the host wheels (default: .venv/bin/python,
                                  else python3)
  --network MODE                  network for the build's RUN steps (e.g. host)
  --load kind|minikube            load the built image into the current kind / minikube cluster
  --kind-cluster NAME             kind cluster name for --load kind (default: kind)
  -h, --help                      this help

Anything after -- is passed to the engine's build command unchanged.

Examples:
  scripts/build-image.sh
  scripts/build-image.sh --wheels host --base tandem-base:bookworm --network host
  scripts/build-image.sh --engine podman --load kind
EOF
}

die_usage() {
  echo "build-image.sh: $1" >&2
  echo "run 'scripts/build-image.sh --help' for usage" >&2
  exit 2
}

die() {
  echo "build-image.sh: $1" >&2
  exit 1
}

engine="" tag="" base="" wheels="index" extras="kubernetes" python="" network="" load="" kind_cluster="kind"
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --extras)
      [ $# -ge 2 ] || die_usage "$1 needs a value"
      extras=$2; shift 2 ;;
    --engine|--tag|--base|--wheels|--python|--network|--load|--kind-cluster)
      [ $# -ge 2 ] && [ -n "$2" ] || die_usage "$1 needs a value"
      case "$1" in
        --engine) engine=$2 ;;
        --tag) tag=$2 ;;
        --base) base=$2 ;;
        --wheels) wheels=$2 ;;
        --python) python=$2 ;;
        --network) network=$2 ;;
        --load) load=$2 ;;
        --kind-cluster) kind_cluster=$2 ;;
      esac
      shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) die_usage "unknown argument: $1" ;;
  esac
done

case "$engine" in ""|docker|podman|buildah) ;; *) die_usage "--engine must be docker, podman or buildah, not '$engine'" ;; esac
case "$wheels" in index|host) ;; *) die_usage "--wheels must be index or host, not '$wheels'" ;; esac
case "$load" in ""|kind|minikube) ;; *) die_usage "--load must be kind or minikube, not '$load'" ;; esac

# --- the engine ----------------------------------------------------------------------------
if [ -z "$engine" ]; then
  for candidate in docker podman buildah; do
    if command -v "$candidate" >/dev/null 2>&1; then engine=$candidate; break; fi
  done
  [ -n "$engine" ] || die "no container engine found (docker, podman or buildah); install one, or see docs/image.md for a hand-started dockerd"
fi
command -v "$engine" >/dev/null 2>&1 || die "$engine is not installed (not on PATH)"
case "$engine" in
  docker)
    docker info >/dev/null 2>&1 \
      || die "cannot reach the Docker daemon (DOCKER_HOST=${DOCKER_HOST:-unix:///var/run/docker.sock}): start dockerd or set DOCKER_HOST" ;;
  podman)
    podman info >/dev/null 2>&1 || die "podman cannot run here ('podman info' fails)" ;;
  buildah)
    buildah --version >/dev/null 2>&1 || die "buildah cannot run here ('buildah --version' fails)" ;;
esac
if [ -n "$load" ]; then
  command -v "$load" >/dev/null 2>&1 || die "$load is not installed (not on PATH): cannot --load $load"
fi

# --- metadata ------------------------------------------------------------------------------
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$REPO/pyproject.toml" | head -n 1)
[ -n "$version" ] || die "no version in $REPO/pyproject.toml"
tag=${tag:-localhost/tandem:$version}
revision=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)
source_url=$(git -C "$REPO" remote get-url origin 2>/dev/null || echo unknown)

# --- host wheels ---------------------------------------------------------------------------
if [ "$wheels" = host ]; then
  if [ -z "$python" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then python="$REPO/.venv/bin/python"; else python=python3; fi
  fi
  command -v "$python" >/dev/null 2>&1 || die "no Python to build the host wheels: $python"
  # The same lists the Dockerfile derives: build-system requires + wheel, dependencies + extras.
  requirements=$("$python" - "$REPO/pyproject.toml" "$extras" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    p = tomllib.load(f)
optional = p["project"].get("optional-dependencies", {})
names = [e.strip() for e in sys.argv[2].split(",") if e.strip()]
unknown = [e for e in names if e not in optional]
if unknown:
    sys.exit(f"no such optional dependency group in pyproject.toml: {unknown}")
print("\n".join([*p["build-system"]["requires"], "wheel", *p["project"]["dependencies"],
                 *(r for e in names for r in optional[e])]))
EOF
  ) || die "cannot list the requirements from pyproject.toml with $python (needs Python >= 3.11; see above)"
  echo "build-image.sh: host wheels for $("$python" -c 'import sys; print("cp%d%d" % sys.version_info[:2])') into $WHEEL_DIR"
  rm -rf "$WHEEL_DIR"
  mkdir -p "$WHEEL_DIR"
  req_file="$WHEEL_DIR/requirements.txt"
  printf '%s\n' "$requirements" > "$req_file"
  "$python" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$WHEEL_DIR" -r "$req_file" \
    || die "pip wheel failed on the host"
fi

# --- build ---------------------------------------------------------------------------------
args=(--file "$REPO/Dockerfile" --tag "$tag"
      --build-arg "WHEELS_FROM=$wheels"
      --build-arg "TANDEM_EXTRAS=$extras"
      --build-arg "TANDEM_VERSION=$version"
      --build-arg "REVISION=$revision"
      --build-arg "SOURCE_URL=$source_url")
[ -z "$base" ] || args+=(--build-arg "BASE_IMAGE=$base")
[ -z "$network" ] || args+=(--network "$network")
case "$engine" in
  docker|podman) cmd=("$engine" build) ;;
  buildah) cmd=(buildah bud --isolation chroot) ;;
esac
echo "build-image.sh: ${cmd[*]} ${args[*]} ${extra[*]} $REPO"
start=$SECONDS
"${cmd[@]}" "${args[@]}" "${extra[@]}" "$REPO" || die "the image build failed"
echo "build-image.sh: built $tag in $((SECONDS - start)) s"

# --- load ----------------------------------------------------------------------------------
# kind and minikube read images from a Docker daemon; from podman or buildah, go by archive.
if [ -n "$load" ]; then
  archive=""
  if [ "$engine" != docker ]; then
    archive=$(mktemp --suffix=.tar)
    trap 'rm -f "$archive"' EXIT
    "$engine" push "$tag" "docker-archive:$archive:$tag" || die "cannot save $tag to $archive"
  fi
  case "$load" in
    kind)
      if [ -z "$archive" ]; then
        kind load docker-image "$tag" --name "$kind_cluster"
      else
        kind load image-archive "$archive" --name "$kind_cluster"
      fi ;;
    minikube) minikube image load "${archive:-$tag}" ;;
  esac || die "loading $tag into $load failed"
  echo "build-image.sh: loaded $tag into $load"
fi
