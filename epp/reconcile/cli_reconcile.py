"""`epp reconcile`: run the ModelPool reconciler (or one pass with `--once`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from epp import IMAGE
from epp.reconcile.apply import FIELD_MANAGER, ApplySettings
from epp.reconcile.controller import Controller, reconcile_all
from epp.reconcile.kube import Kube


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kubeconfig", default="",
                        help="kubeconfig path (default: in-cluster, then $KUBECONFIG or ~/.kube/config)")
    parser.add_argument("-n", "--namespace", default="", help="watch one namespace (default all)")
    parser.add_argument("--field-manager", default=FIELD_MANAGER,
                        help="server-side apply field manager name")
    parser.add_argument("--force-conflicts", action="store_true",
                        help="take over fields another applier owns instead of reporting them")
    parser.add_argument("--resync", type=float, default=30.0, help="seconds between full passes")
    parser.add_argument("--once", action="store_true", help="reconcile every pool once and exit")
    parser.add_argument("--epp-image", default=IMAGE,
                        help="image of the pools' EPP Deployments (a ModelPool's "
                             "spec.epp.image wins); in a cluster, the reconciler's own image")
    parser.add_argument("--log-level", default="INFO", help="DEBUG | INFO | WARNING | ERROR")


async def _main(args: argparse.Namespace) -> int:
    kube = await Kube.connect(args.kubeconfig)
    settings = ApplySettings(args.field_manager, args.force_conflicts, args.epp_image)
    try:
        if args.once:
            results = await reconcile_all(kube, args.namespace, settings)
            for (ns, name), r in sorted(results.items()):
                state = "ok" if r.ok else f"{r.reason}: {r.message}"
                print(f"{ns}/{name}: {state} (moves={r.moves}, pruned={len(r.pruned)})")
            return 0 if all(r.ok for r in results.values()) else 1
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await Controller(kube, args.namespace, settings, args.resync).run(stop)
        return 0
    finally:
        await kube.close()


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(_main(args))
