"""A run on a two-node Ray cluster made on this machine (Ray's own `ray.cluster_utils.Cluster`: a
raylet per node), for tests/test_multinode.py; run as a script in a process of its own, since the
test session already holds a Ray cluster.

    python tests/multinode_run.py RUN_DIR [--kill-worker-node-after-step N] [overrides ...]

Prints one JSON line: the run's rows, which node each rollout worker started on, the head node, and
(with --kill-...) the node removed and when.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time


def _worker_nodes() -> dict[str, str]:
    import ray
    from ray._private import state

    job = ray.get_runtime_context().get_job_id()
    out = {}
    for a in state.actors().values():
        if a["ActorClassName"].endswith("RolloutWorker") and a["JobID"] == job and a["State"] == "ALIVE":
            out[a["ActorID"]] = a["Address"]["NodeID"]
    return out


def _generating(metrics: str, workers: int) -> int:
    """Rows (steps) of the run so far, after the first restart, with tokens from every worker."""
    if not os.path.exists(metrics):
        return 0
    with open(metrics, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    after = [r for r in rows if r.get("rollout/restarts", 0) >= 1]
    return sum(all(r.get(f"rollout/worker{i}/tokens_per_s", 0) > 0 for i in range(workers)) for r in after)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--kill-worker-node-after-step", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="rollout workers to see alive before noting where")
    ap.add_argument(
        "--stop-when-back", action="store_true", help="stop the run once every worker generates again"
    )
    args, overrides = ap.parse_known_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")  # to stderr
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from ray.cluster_utils import Cluster

    from slime import api

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    second = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    import ray

    ray.init(address=cluster.address, log_to_driver=False)
    head = ray.get_runtime_context().get_node_id()
    report: dict = {
        "head": head,
        "second": second.node_id,
        "started_on": {},
        "removed_at_s": None,
        "after_loss": {},
    }

    def watch() -> None:
        metrics = os.path.join(args.run_dir, "metrics.jsonl")
        while True:
            nodes = _worker_nodes()
            if len(nodes) >= args.workers and not report["started_on"]:
                report["started_on"] = dict(nodes)
            if args.kill_worker_node_after_step and os.path.exists(metrics):
                with open(metrics, encoding="utf-8") as f:
                    done = sum(1 for line in f if line.strip())
                if done >= args.kill_worker_node_after_step and report["removed_at_s"] is None:
                    report["removed_at_s"] = time.time()
                    cluster.remove_node(second)
            if report["removed_at_s"] is not None and len(nodes) >= args.workers and not report["after_loss"]:
                alive = dict(nodes)
                if second.node_id not in alive.values():  # every worker up again, none on the lost node
                    report["after_loss"] = alive
            if report["after_loss"] and args.stop_when_back and _generating(metrics, args.workers) >= 2:
                # Two steps with tokens from every worker since the loss: stop the run cleanly (SIGINT,
                # as Ctrl-C), however many steps that took; trainer.steps is only the cap.
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.5)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    from slime.controller import Stopped

    try:
        api.run([*overrides, f"ray.address={cluster.address}"], run_dir=args.run_dir)
    except Stopped as e:
        report["stopped"] = str(e)
    with open(os.path.join(args.run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        report["rows"] = [json.loads(line) for line in f if line.strip()]
    print(json.dumps(report, default=str))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
