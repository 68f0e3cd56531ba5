# tandem runtime image: the `tandem` command (controller and node plugin) plus the host
# tools the node plugin runs (LVM, mkfs, mount, losetup, nbd-client, nbdfuse).
#
# Build context = a directory holding the tandem wheel and its dependencies' wheels,
# built on the host (pip inside the build cannot reach an index here), e.g.:
#   .venv/bin/pip wheel --wheel-dir /tmp/tandem-wheels .
#   docker build -f deploy/Dockerfile -t localhost/tandem:0.1.0 /tmp/tandem-wheels
# See deploy/README.md.

# No registry is reachable from the build machines: the base is a local image by default
# (`debootstrap --variant=minbase bookworm` + `docker import`); any Debian bookworm works.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

ARG TANDEM_VERSION=0.1.0

LABEL org.opencontainers.image.title="tandem" \
      org.opencontainers.image.description="tandem CSI driver: synchronously replicated local block volumes" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${TANDEM_VERSION}"

# Package versions follow the base image's Debian release (bookworm); pinning exact
# Debian revisions would break the build at every point release.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 \
        python3-venv \
        lvm2 \
        e2fsprogs \
        xfsprogs \
        util-linux \
        mount \
        libnbd-bin \
        fuse3 \
        nbd-client \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*

# Wheels only, no index: every dependency must be in the build context.
COPY *.whl /tmp/wheels/
RUN python3 -m venv /opt/tandem \
    && /opt/tandem/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheels \
        "tandem-csi==${TANDEM_VERSION}" \
    && rm -rf /tmp/wheels \
    && /opt/tandem/bin/tandem --help > /dev/null

ENV PATH="/opt/tandem/bin:${PATH}" \
    PYTHONUNBUFFERED=1

ENTRYPOINT ["tandem"]
