# tandem image: the `tandem` command (controller and node plugin) and the host tools the node
# plugin runs (mkfs, blkid, mount, losetup, LVM, nbd-client, nbdfuse). docs/image.md has the
# whole story; scripts/build-image.sh wraps the two ways to build it.
#
#   docker build -t localhost/tandem:0.1.0 .                     # a machine with internet
#   scripts/build-image.sh --wheels host --base tandem-base:bookworm -- --network host
#       # no registry, no TLS to PyPI inside the build: wheels made on the host (build/wheels)
#
# The build context is the repository; .dockerignore lets in only pyproject.toml, proto/,
# csi_driver/, replication/ and build/wheels/.

# Any Debian bookworm image works; builder and runtime must share it (the venv built in the
# builder is copied into the runtime and links to its /usr/bin/python3, Python 3.11).
# Pinned by tag, which still moves with Debian point releases and security updates. For a
# reproducible release pin the digest the registry reports for that tag:
#   docker buildx imagetools inspect debian:bookworm-slim     # -> Digest: sha256:...
#   docker build --build-arg BASE_IMAGE=debian:bookworm-slim@sha256:<digest> .
# Where no registry is reachable, pass a local image (debootstrap + docker import).
ARG BASE_IMAGE=debian:bookworm-slim

# --- stage 1: build the tandem wheel (with its generated gRPC stubs) and every dependency's
# wheel, and install them into a venv at /opt/tandem --------------------------------------
FROM ${BASE_IMAGE} AS builder

# Where the dependency wheels come from: "index" (PyPI, or whatever pip.conf/PIP_* point to)
# or "host" (wheels prepared on the host in build/wheels/, installed with --no-index).
ARG WHEELS_FROM=index
# Optional dependency groups of pyproject.toml to install too, comma-separated. kubernetes:
# the controller's --node-down-responder (deploy/components/node-down-responder). "" for none.
ARG TANDEM_EXTRAS=kubernetes

# Debian package versions follow the base image's release; pinning exact Debian revisions
# (DL3008) breaks the build at every point release, when the old revision leaves the mirror.
# Reproducibility comes from pinning the base image by digest instead.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates \
        python3 \
        python3-venv \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . /src

# Requirements come from pyproject.toml, so versions are pinned in one place:
# build-requirements.txt = [build-system] requires + wheel + dependencies (grpcio-tools runs
# proto/generate.py); requirements.txt = dependencies + the TANDEM_EXTRAS groups (an unknown
# group fails the build). The stubs under csi_driver/_gen are not in the context
# (.dockerignore): proto/generate.py writes them here, before the wheel is built, and the
# wheel is checked to hold one _pb2 and one _pb2_grpc module per proto/*.proto. Only the
# runtime requirements go into /opt/tandem.
RUN set -eu; \
    case "${WHEELS_FROM}" in \
        host) export PIP_NO_INDEX=1 PIP_FIND_LINKS=/src/build/wheels ;; \
        index) ;; \
        *) echo "WHEELS_FROM must be 'index' or 'host', not '${WHEELS_FROM}'" >&2; exit 1 ;; \
    esac; \
    python3 -c 'import sys, tomllib; p = tomllib.load(open("pyproject.toml", "rb")); opt = p["project"].get("optional-dependencies", {}); run = p["project"]["dependencies"] + [r for e in sys.argv[1].split(",") if e.strip() for r in opt[e.strip()]]; open("/tmp/build-requirements.txt", "w").write("\n".join([*p["build-system"]["requires"], "wheel", *p["project"]["dependencies"]]) + "\n"); open("/tmp/requirements.txt", "w").write("\n".join(run) + "\n")' "${TANDEM_EXTRAS}"; \
    python3 -m venv /opt/build; \
    /opt/build/bin/pip wheel --no-cache-dir --disable-pip-version-check --wheel-dir /wheels -r /tmp/build-requirements.txt -r /tmp/requirements.txt; \
    /opt/build/bin/pip install --no-cache-dir --disable-pip-version-check --no-index --find-links /wheels -r /tmp/build-requirements.txt; \
    /opt/build/bin/python proto/generate.py; \
    /opt/build/bin/pip wheel --no-cache-dir --disable-pip-version-check --no-index --no-deps --no-build-isolation --wheel-dir /dist .; \
    /opt/build/bin/python -c 'import glob, pathlib, sys, zipfile; names = set(zipfile.ZipFile(glob.glob("/dist/tandem_csi-*.whl")[0]).namelist()); want = {f"csi_driver/_gen/{p.stem}{s}.py" for p in pathlib.Path("proto").glob("*.proto") for s in ("_pb2", "_pb2_grpc")}; sys.exit(f"stubs missing from the wheel: {sorted(want - names)}" if want - names else 0)'; \
    python3 -m venv /opt/tandem; \
    /opt/tandem/bin/pip install --no-cache-dir --disable-pip-version-check --no-index --find-links /wheels -r /tmp/requirements.txt /dist/tandem_csi-*.whl; \
    /opt/tandem/bin/pip check --disable-pip-version-check; \
    /opt/tandem/bin/pip uninstall --yes --disable-pip-version-check pip

# --- stage 2: the runtime ------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime

# scripts/build-image.sh passes pyproject's version, git's origin URL and the commit.
ARG TANDEM_VERSION=0.1.0
ARG SOURCE_URL=unknown
ARG REVISION=unknown

LABEL org.opencontainers.image.title="tandem" \
      org.opencontainers.image.description="tandem CSI driver: local disks pooled into synchronously replicated block volumes with fast failover" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${TANDEM_VERSION}" \
      org.opencontainers.image.revision="${REVISION}"

# What the node plugin runs: mkfs.ext4/resize2fs (e2fsprogs), mkfs.xfs/xfs_growfs (xfsprogs),
# blkid (util-linux), mount/umount/losetup (mount), lvcreate/lvs/vgs (lvm2; thin pools need
# thin_check from thin-provisioning-tools), nbd-client (kernel nbd attach), nbdfuse
# (libnbd-bin; the attach path where the kernel has no nbd module) and fusermount3 (fuse3).
# No kmod: the node plugin never loads modules, the host does (`modprobe nbd`, deploy/README).
# DL3008: see the builder stage; versions follow the base image's Debian release.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 \
        e2fsprogs \
        xfsprogs \
        util-linux \
        mount \
        lvm2 \
        thin-provisioning-tools \
        nbd-client \
        fuse3 \
        libnbd-bin \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*

COPY --from=builder /opt/tandem /opt/tandem

ENV PATH="/opt/tandem/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# Fail the build, not the rollout, if the command or a generated stub cannot be imported.
RUN tandem --help > /dev/null \
    && python3 -c "import csi_driver.server, csi_driver._gen.csi_pb2_grpc, csi_driver._gen.agent_pb2_grpc, csi_driver._gen.etcd_pb2_grpc"

# Root on purpose, no USER: the node plugin runs privileged (deploy/base/node.yaml). It
# mounts and unmounts in the kubelet's directories, creates loop devices, opens /dev/fuse and
# /dev/nbd*, and runs LVM on the host's disks; none of that works as an unprivileged user.
# The controller needs none of it; its pod can drop root with the pod's securityContext
# (runAsNonRoot, runAsUser) since nothing in /opt/tandem needs write access.
# No HEALTHCHECK: Kubernetes ignores it; the livenessprobe sidecar probes the CSI socket.
ENTRYPOINT ["tandem"]
CMD ["--help"]
