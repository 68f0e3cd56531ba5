"""The ``tandem`` command: the daemons (controller, node, node-front), credentials, and in a
source checkout the dev tooling's commands (cluster, bench, volume: ``devtools``).

User-facing output is printed here and nowhere else. Bad flags exit 2 with a message that
names the flag; an operation that fails exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any

from csi_driver.config import DEFAULT_LEASE_TTL_S
from replication.hold import DEFAULT_HOLD_S

# gRPC's fork handlers crash children forked (for mount, losetup, mkfs) while its threads are
# busy ("skipping fork() handlers", then SIGSEGV before exec). The children exec at once and
# never touch gRPC, so the handlers are not needed. Must be set before grpc is imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from csi_driver import config as cfg
from csi_driver.agent_auth import KeyFileError, load_public_keys, load_signer
from replication.peer_auth import SecretError, load_secret
from replication.peer_tls import TlsConfigError, load_peer_tls

log = logging.getLogger(__name__)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        stream=sys.stderr,
    )


def _run(coro: object) -> None:
    try:
        import uvloop

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]


def _etcd(args: argparse.Namespace) -> cfg.EtcdConfig:
    return cfg.EtcdConfig(
        endpoints=cfg.parse_etcd_endpoints(args.etcd_endpoints),
        prefix=cfg.check_prefix(args.etcd_prefix),
    )


def cmd_controller(args: argparse.Namespace) -> int:
    from csi_driver.server import run_controller

    node_down_mode = args.node_down_responder
    if node_down_mode is None:
        node_down_mode = cfg.default_node_down_mode(args.kubeconfig, os.environ)
        log.info("node-down responder: %s by default (%s)", node_down_mode,
                 "a Kubernetes API is configured" if node_down_mode != "off"
                 else "no Kubernetes API: not in a pod, no --kubeconfig")
    config = cfg.ControllerConfig(
        csi_socket=cfg.parse_unix_endpoint(args.csi_endpoint, "--csi-endpoint"),
        etcd=_etcd(args),
        agent_key_file=Path(args.agent_key_file),
        default_replicas=args.default_replicas,
        replace_after_s=args.replace_dead_after,
        node_down_mode=node_down_mode,
        node_down_grace_s=args.node_down_grace,
        node_down_max_fraction=args.node_down_max_fraction,
        kubeconfig=Path(args.kubeconfig) if args.kubeconfig else None,
        kube_api_server=args.kube_api_server,
    )
    load_signer(config.agent_key_file)  # bad credentials: exit 2 now
    _run(run_controller(config))
    return 0


def cmd_node_front(args: argparse.Namespace) -> int:
    from csi_driver.node.front import run

    csi_socket = cfg.parse_unix_endpoint(args.csi_endpoint, "--csi-endpoint")
    backend = cfg.parse_unix_endpoint(args.data_plane_endpoint, "--data-plane-endpoint")
    if backend == csi_socket:
        raise cfg.ConfigError("--data-plane-endpoint must differ from --csi-endpoint")
    _run(run(csi_socket, f"unix://{backend}"))
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    from csi_driver.server import run_node
    from replication.heap import keep_large_buffers_on_heap

    config = cfg.NodeConfig(
        node_id=args.node_id,
        csi_socket=cfg.parse_unix_endpoint(args.csi_endpoint, "--csi-endpoint"),
        agent_listen=cfg.parse_host_port(args.agent_listen, "--agent-listen"),
        replica_listen=cfg.parse_host_port(args.replica_listen, "--replica-listen"),
        etcd=_etcd(args),
        pool_kind=args.pool,
        pool_dir=Path(args.pool_dir) if args.pool_dir else None,
        pool_size=cfg.parse_size(args.pool_size) if args.pool_size else 0,
        lvm_vg=args.lvm_vg,
        lvm_thin_pool=args.lvm_thin_pool,
        state_dir=Path(args.state_dir),
        cluster_secret_file=Path(args.cluster_secret_file),
        agent_public_key_file=Path(args.agent_public_key_file),
        lease_ttl_s=args.lease_ttl,
        max_volumes=args.max_volumes,
        hold_io_s=args.hold_io_timeout,
        tls_cert_file=Path(args.tls_cert_file) if args.tls_cert_file else None,
        tls_key_file=Path(args.tls_key_file) if args.tls_key_file else None,
        tls_trust_file=Path(args.tls_trust_file) if args.tls_trust_file else None,
        health_listen=(cfg.parse_host_port(args.health_listen, "--health-listen")
                       if args.health_listen else None),
    )
    # Bad credentials: exit 2 now with one line, not a traceback from the daemon.
    load_secret(config.cluster_secret_file)
    load_public_keys(config.agent_public_key_file)
    if config.tls_cert_file and config.tls_key_file:
        load_peer_tls(config.tls_cert_file, config.tls_key_file, config.tls_trust_file)
    keep_large_buffers_on_heap()  # the node process hosts the replica server
    _run(run_node(config))
    return 0


def _add_daemon_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--csi-endpoint", required=True, help="unix:///path/to/csi.sock")
    p.add_argument("--etcd-endpoints", required=True, help="http://HOST:PORT[,...]")
    p.add_argument("--etcd-prefix", default="/tandem/")
    p.add_argument("--log-level", default="info")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    ctl = sub.add_parser("controller", help="run the CSI controller plugin")
    _add_daemon_flags(ctl)
    ctl.add_argument("--agent-key-file", required=True,
                     help="the private key that signs every node-agent call, mode 0600 "
                     "(docs/security.md; tandem credentials generate)")
    ctl.add_argument("--default-replicas", type=int, default=3)
    ctl.add_argument("--replace-dead-after", type=float, default=300.0,
                     help="seconds a replica node must stay dead before it is replaced")
    ctl.add_argument("--node-down-responder", choices=cfg.NODE_DOWN_MODES, default=None,
                     help="fenced: force-delete a dead node's pods as soon as their tandem "
                     "volumes are fenced there (fenced-taint: taint the node out-of-service "
                     "then); taint/delete-pods: the same once the kubelet is silent too "
                     "(docs/node-down-responder.md; needs the 'kubernetes' package). "
                     "Default: fenced with a Kubernetes API (in a pod or --kubeconfig), "
                     "else off")
    ctl.add_argument("--node-down-grace", type=float, metavar="SECONDS",
                     default=cfg.DEFAULT_NODE_DOWN_GRACE_S,
                     help="modes taint and delete-pods: how long tandem's lease and the "
                     "kubelet's must both be silent before the responder acts")
    ctl.add_argument("--node-down-max-fraction", type=float, metavar="FRACTION",
                     default=cfg.DEFAULT_NODE_DOWN_MAX_FRACTION,
                     help="refuse to act while more than this fraction of tandem's nodes "
                     "look dead (likely an etcd or network problem)")
    ctl.add_argument("--kubeconfig", metavar="PATH",
                     help="kubeconfig for the responder (default: in-cluster service account)")
    ctl.add_argument("--kube-api-server", metavar="URL", type=cfg.api_server_url,
                     help="the API server's address for the responder, e.g. "
                     "https://10.0.0.1:6443, where the Service address would need kube-proxy")
    ctl.set_defaults(func=cmd_controller)

    _add_node_front(sub)

    node = sub.add_parser("node", help="run the CSI node plugin on this node")
    _add_daemon_flags(node)
    node.add_argument("--node-id", required=True)
    node.add_argument("--agent-listen", required=True, help="HOST:PORT")
    node.add_argument("--replica-listen", required=True, help="HOST:PORT")
    node.add_argument("--pool", default="file", choices=["file", "lvm"])
    node.add_argument("--pool-dir")
    node.add_argument("--pool-size", help="file pool capacity, e.g. 10G")
    node.add_argument("--lvm-vg")
    node.add_argument("--lvm-thin-pool")
    node.add_argument("--state-dir", required=True)
    node.add_argument("--cluster-secret-file", required=True,
                      help="the replication secret every node holds, mode 0600, one per line "
                      "while rotating (docs/security.md; tandem credentials generate)")
    node.add_argument("--agent-public-key-file", required=True,
                      help="the controller's public key(s): only calls it signed reach the "
                      "agent API (docs/security.md)")
    node.add_argument("--lease-ttl", type=cfg.lease_ttl_arg, default=DEFAULT_LEASE_TTL_S,
                      help="ownership and node lease TTL, whole seconds (takeover waits this "
                      "long)")
    node.add_argument("--hold-io-timeout", type=float, default=DEFAULT_HOLD_S,
                      help="how long a volume's I/O waits (instead of failing) while its "
                      "owner cannot confirm its lease, e.g. during an etcd outage")
    node.add_argument("--max-volumes", type=int, default=0)
    node.add_argument("--tls-cert-file", help="encrypt replication with TLS: the cluster's "
                      "tls.crt (every node alike; docs/security.md for the cost)")
    node.add_argument("--tls-key-file", help="the cluster's tls.key, mode 0600")
    node.add_argument("--tls-trust-file", help="the certificates peers must chain to "
                      "(default: --tls-cert-file; cert-manager: its ca.crt)")
    node.add_argument("--health-listen", metavar="HOST:PORT",
                      help="serve GET /readyz here: 200 while the node lease is renewed and "
                      "the pool answers, else 503 and why (a readinessProbe)")
    node.set_defaults(func=cmd_node)

    _add_credentials(sub)
    # The dev cluster, the demo and the benches live in the source tree only (devtools/):
    # an installed package or the image has no such commands.
    if importlib.util.find_spec("devtools") is not None:
        from devtools.cli_commands import add_commands

        add_commands(sub)
    return parser


def _add_node_front(sub: Any) -> None:
    front = sub.add_parser(
        "node-front", help="serve kubelet's CSI node socket, forwarding to this node's data "
        "plane (tandem node), so the plugin can restart without touching any I/O")
    front.add_argument("--csi-endpoint", required=True, help="unix:///path/to/csi.sock")
    front.add_argument("--data-plane-endpoint", required=True,
                       help="the CSI socket of this node's `tandem node`, unix:///path")
    front.add_argument("--log-level", default="info")
    front.set_defaults(func=cmd_node_front)


def _add_credentials(sub: Any) -> None:
    creds = sub.add_parser("credentials", help="the cluster's replication secret")
    crsub = creds.add_subparsers(dest="credentials_command", required=True)
    gen = crsub.add_parser("generate", help="make new cluster credentials (docs/security.md)")
    gen.add_argument("--dir", help="write cluster-secret, agent.key, agent.pub here")
    gen.add_argument("--kubernetes", action="store_true",
                     help="print the two Secret manifests the deployment mounts instead")
    gen.add_argument("--namespace", default="tandem-system")
    gen.set_defaults(func=_credentials_generate)


def _credentials_generate(args: argparse.Namespace) -> int:
    """New credentials into --dir, or as Kubernetes Secret manifests on stdout."""
    from csi_driver.credentials import kubernetes_secrets, write_credentials

    if args.kubernetes:
        print(kubernetes_secrets(args.namespace), end="")
        return 0
    if args.dir is None:
        print("tandem: error: give --dir DIR or --kubernetes", file=sys.stderr)
        return 2
    try:
        write_credentials(Path(args.dir))
    except FileExistsError as exc:
        print(f"tandem: error: {exc}; rotate by adding lines (docs/security.md)",
              file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"tandem: error: cannot write {args.dir}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(getattr(args, "log_level", "warning"))
    try:
        return int(args.func(args))
    except (cfg.ConfigError, SecretError, KeyFileError, TlsConfigError) as exc:
        print(f"tandem: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
