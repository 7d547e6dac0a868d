"""The same OpenAI-compatible app on Ray Serve: N replicas, each owning one engine pair.

    python -m runtime.serve_ray --bundle DIR --replicas 2                 # local Ray, port 8000
    python -m runtime.serve_ray --bundle DIR --replicas 8 --address auto  # on a running cluster

Needs the ``ray`` extra. Every replica loads the bundle from the same path, so on a cluster the
bundle must be at that path on each node (a shared file system or a copy). Each replica runs
:func:`runtime.serve.create_app` unchanged: its own slots, queue, 429s and metrics. Ray's proxy
spreads requests over the replicas and sends each at most one request more than it admits
(``max_ongoing_requests`` = slots + queue + 1), so a full replica answers 429 with
``Retry-After``; the proxy itself queues at most ``--queue`` requests and answers 503 beyond.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict
from typing import Any

from .serve import ServeConfig, build_parser, config_from_args, load_pipeline

log = logging.getLogger("runtime.serve_ray")


def deployment(args: argparse.Namespace, replicas: int, cpus: float) -> Any:
    """A bound Ray Serve application of the server for ``args`` (the serve CLI's flags)."""
    from ray import serve

    cfg = config_from_args(args)

    # one more than a replica admits, so its own 429 + Retry-After stays reachable; Ray's proxy
    # holds at most --queue more per deployment and answers 503 beyond that
    @serve.deployment(name="qwenvl", num_replicas=replicas,
                      max_ongoing_requests=cfg.parallel + cfg.queue + 1,
                      max_queued_requests=max(cfg.queue, 1),
                      ray_actor_options={"num_cpus": cpus})
    @serve.ingress()
    class QwenVLReplica:
        def __init__(self, args_dict: dict[str, Any], cfg_dict: dict[str, Any]):
            self.pipe = load_pipeline(argparse.Namespace(**args_dict))
            self.cfg = ServeConfig(**cfg_dict)

        def __serve_build_asgi_app__(self) -> Any:
            from .serve import create_app
            return create_app(self.pipe, self.cfg)

    return QwenVLReplica.bind(vars(args), asdict(cfg))


def build_ray_parser() -> argparse.ArgumentParser:
    p = build_parser()
    p.prog = "python -m runtime.serve_ray"
    p.description = ("Serve a bundle with OpenAI's chat-completions API on Ray Serve: N replicas "
                     "each owning one engine pair (needs the ray extra).")
    p.epilog = None
    p.add_argument("--replicas", type=int, default=2, metavar="N", help="replicas (default 2)")
    p.add_argument("--replica-cpus", type=float, default=1.0, metavar="C",
                   help="CPUs Ray reserves per replica (default 1)")
    p.add_argument("--address", metavar="ADDR",
                   help="Ray cluster to join (auto: the one this node belongs to); default: "
                        "start a local Ray")
    return p


def start(args: argparse.Namespace, blocking: bool = True) -> str:
    """Start Ray Serve with the app; returns its base URL."""
    import ray
    from ray import serve

    local = {} if args.address else {"include_dashboard": False}
    ray.init(address=args.address, ignore_reinit_error=True, log_to_driver=False, **local)
    serve.start(http_options={"host": args.host, "port": args.port})
    app = deployment(args, args.replicas, args.replica_cpus)
    serve.run(app, name="qwenvl", route_prefix="/", blocking=False)
    url = f"http://{args.host}:{args.port}"
    log.info("serving %d replica(s) on %s", args.replicas, url)
    if blocking:
        import time
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return url


def main(argv: list[str] | None = None) -> int:
    args = build_ray_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s: %(message)s")
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        print("error: Ray Serve is missing: pip install 'qwenvl-edge[ray]'", file=sys.stderr)
        return 2
    if args.replicas < 1:
        print("error: --replicas must be >= 1", file=sys.stderr)
        return 2
    start(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
