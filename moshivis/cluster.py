"""python -m moshivis.cluster: the server on Ray Serve, one engine replica per GPU behind one address.

python -m moshivis.cluster --replicas N [--preset small | --config CONFIG.json --checkpoint PATH]
       [--host 127.0.0.1] [--port 8000] [--num-gpus G] [--gpus-per-replica 1] [--cpus-per-replica 1]
       [--grace-s 600] [--max-queued 4] [--dashboard] [--print-config]
       [every engine, media and server option of `python -m moshivis.server`]

Starts a local Ray instance (node address 127.0.0.1, usage stats off, dashboard off unless
--dashboard) and deploys the `moshivis` application (`moshivis.serve.ray_app`) declaratively, as
`serve deploy` would: N replicas, each one Engine on one GPU, behind Serve's proxy on --host:--port
(WebSockets: ours on any path, Kyutai's on /api/chat; GET /metrics sums the replicas,
/metrics/replicas labels them). Ctrl-C / SIGTERM stops Serve and Ray.

--print-config prints that Serve config (YAML) and exits: the file to `serve deploy` on a real
multi-node cluster (README: "Cluster"); editing its `num_replicas` and deploying it again scales
without touching the other replicas. Bad options: one line on stderr, exit status 2.
"""
import argparse
import os
import signal
import sys
import time

# Before Ray is imported (the processes Ray starts inherit them): no usage reports, and a single-machine
# instance whose node address is 127.0.0.1, so Ray's own servers listen on the loopback interface only
# (Ray's switch for this is named after the platforms where it is the default).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Serve's proxy closes the WebSockets of a replica that died with a reason (1011) instead of dropping them.
os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "moshivis.serve.router:proxy_middlewares")

from . import cli  # noqa: E402
from .serve.options import add_engine_args, add_media_args, add_server_args  # noqa: E402

IMPORT_PATH = "moshivis.serve.ray_app:build_app"
CLUSTER_OPTIONS = ("replicas", "host", "port", "num_gpus", "gpus_per_replica", "cpus_per_replica", "grace_s",
                   "max_queued", "dashboard", "print_config", "object_store_mb", "ready_timeout_s", "log_level")


def parser() -> argparse.ArgumentParser:
    ap = cli.ArgumentParser(prog="python -m moshivis.cluster", description=__doc__)
    ap.add_argument("--replicas", type=cli.positive_int, default=1, help="engine replicas (one per GPU)")
    ap.add_argument("--host", default="127.0.0.1", help="address of Serve's proxy (0.0.0.0: every interface)")
    ap.add_argument("--port", type=cli.port_number, default=8000, help="port of Serve's proxy")
    ap.add_argument("--num-gpus", type=cli.non_negative_int,
                    help="GPUs Ray may use on this machine (default: those it detects; on a machine without GPUs, "
                         "logical ones, for tests)")
    ap.add_argument("--gpus-per-replica", type=cli.non_negative_float, default=1.0, help="0: engines on the CPU")
    ap.add_argument("--cpus-per-replica", type=cli.non_negative_float, default=1.0,
                    help="CPUs reserved per replica (0 on a small test machine)")
    ap.add_argument("--grace-s", type=cli.positive_float, default=600.0,
                    help="a removed replica's drain: its open streams go on for up to this long (Serve's "
                         "graceful_shutdown_timeout_s); longer than the longest conversation you allow")
    ap.add_argument("--max-queued", type=cli.non_negative_int, default=32,
                    help="connections Serve's proxy holds while it picks a replica, or while every replica is at "
                         "max_streams + 2 connections; beyond, new ones are refused at the handshake (HTTP 500). "
                         "Keep it above the largest burst of simultaneous opens")
    ap.add_argument("--object-store-mb", type=cli.positive_int, default=256,
                    help="Ray's object store (the app barely uses it)")
    ap.add_argument("--dashboard", action="store_true", help="start Ray's dashboard on 127.0.0.1:8265 (then `serve "
                                                             "deploy FILE` and `serve status` work against this instance)")
    ap.add_argument("--ready-timeout-s", type=cli.positive_float, default=600.0,
                    help="give up if the replicas are not up by then")
    ap.add_argument("--print-config", action="store_true", help="print the Serve config (YAML) and exit")
    ap.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add_engine_args(ap)
    add_server_args(ap)
    add_media_args(ap)
    return ap


def app_args(args: argparse.Namespace) -> dict:
    """The application's `args`: the engine, media and server options given on the command line (those left
    at their defaults are resolved on each replica, e.g. --device to its own GPU)."""
    defaults = parser().parse_args([])
    return {k: v for k, v in vars(args).items()
            if k not in CLUSTER_OPTIONS and v is not None and v != getattr(defaults, k)}


def serve_config(args: argparse.Namespace) -> dict:
    """The Serve config (what `serve deploy` takes) for these options."""
    from .serve.ray_app import APP, COLLECTOR, DEPLOYMENT, HEADROOM, max_streams, option_argv
    options = app_args(args)
    streams = max_streams(option_argv(options))
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": args.host, "port": args.port},
        "applications": [{
            "name": APP, "route_prefix": "/", "import_path": IMPORT_PATH, "args": options,
            "deployments": [
                {"name": DEPLOYMENT, "num_replicas": args.replicas, "max_ongoing_requests": streams + HEADROOM,
                 "max_queued_requests": args.max_queued, "graceful_shutdown_timeout_s": args.grace_s,
                 "ray_actor_options": {"num_cpus": args.cpus_per_replica, "num_gpus": args.gpus_per_replica}},
                {"name": COLLECTOR, "num_replicas": 1, "ray_actor_options": {"num_cpus": 0}},
            ]}],
    }


def deploy(config: dict, timeout_s: float = 600.0) -> None:
    """Apply a Serve config to the running Serve instance (as `serve deploy` does: a change of
    `num_replicas` alone adds or drains replicas, the others go on) and wait until it is running."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema
    _get_global_client().deploy_apps(ServeDeploySchema(**config))
    deadline = time.monotonic() + timeout_s
    name = config["applications"][0]["name"]
    while True:
        app = serve.status().applications.get(name)
        status = str(getattr(app, "status", ""))
        if status.endswith("RUNNING"):
            return
        if status.endswith("DEPLOY_FAILED"):
            raise RuntimeError(f"the application failed to deploy: {app.message.splitlines()[-1] if app.message else ''}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the application is not running after {timeout_s:g} s (status {status}): are there "
                               "enough GPUs for the replicas?")
        time.sleep(0.5)


def start(args: argparse.Namespace) -> str:
    """Ray bound to 127.0.0.1 and Serve's proxy; returns the Ray address (for `ray.init(address=...)`)."""
    import ray
    from ray import serve
    ray.init(num_gpus=args.num_gpus, include_dashboard=args.dashboard, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1", object_store_memory=args.object_store_mb << 20, log_to_driver=False,
             logging_level=args.log_level)
    gpus = ray.cluster_resources().get("GPU", 0)
    if args.replicas * args.gpus_per_replica > gpus:
        ray.shutdown()
        raise ValueError(f"--replicas {args.replicas} x --gpus-per-replica {args.gpus_per_replica:g} needs "
                         f"{args.replicas * args.gpus_per_replica:g} GPUs; Ray sees {gpus:g} (--num-gpus declares "
                         "logical GPUs on a machine without any)")
    serve.start(http_options={"host": args.host, "port": args.port})
    return ray.get_runtime_context().gcs_address


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        cli.require_extras("python -m moshivis.cluster", "cluster")  # before they are imported: name what is missing
    except cli.UsageError as e:
        return cli.fail(e)
    try:
        config = serve_config(args)
    except ValueError as e:
        return cli.fail(e)
    if args.print_config:
        import yaml
        print(yaml.safe_dump(config, sort_keys=False), end="")
        return 0
    import ray
    from ray import serve
    try:
        address = start(args)
        deploy(config, args.ready_timeout_s)
    except (ValueError, RuntimeError, TimeoutError, OSError) as e:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        return cli.fail(e)
    stop = []  # handlers installed after ray.init, which installs its own
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: stop.append(s))
    try:
        base = f"{args.host}:{args.port}"
        print(f"moshivis cluster: {args.replicas} replicas ready; ws://{base}/ (ours), ws://{base}/api/chat (Kyutai's), "
              f"http://{base}/metrics (all replicas), http://{base}/metrics/replicas; Ray at {address}", flush=True)
        while not stop:
            time.sleep(0.2)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
