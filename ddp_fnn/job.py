"""One training job, as every worker runs it: plan (checks, data, resume point), join the
group, the network's alpha and beta for the prediction (a bench file, or the probe when
asked), train (train/loop.py), the prediction beside the measurement, write, leave.

This is where training and the cost model meet, above both: train/ knows nothing of
perfmodel/, and perfmodel/ nothing of train/ (the import contract in pyproject.toml).
Exit statuses: 0, 1 for a run that cannot go on (non-finite loss, diverged replicas, a
peer lost), 2 for bad settings (ConfigError, printed by cli.py).
"""

from __future__ import annotations

import re
import socket
import threading
import time

from ddp_fnn import dist as ddist
from ddp_fnn.config import TrainConfig
from ddp_fnn.core import fileio
from ddp_fnn.observe.progress import print_table
from ddp_fnn.observe.prometheus import NullMetrics
from ddp_fnn.perfmodel import predict
from ddp_fnn.train import checkpoint as ckpt
from ddp_fnn.train import loop, setup
from ddp_fnn.train.outputs import write_outputs
from ddp_fnn.train.setup import note, say


def main(cfg: TrainConfig, dry_run: bool = False) -> int:
    """Plan, join the group, train, write, leave. Returns the exit status."""
    rank, _, world = ddist.worker_identity()
    plan = setup.plan(cfg, rank, world)
    bench = predict.read_bench_json(cfg.predict.bench_json) if cfg.predict.bench_json is not None else None
    if plan.resume is not None and rank == 0:
        for path, why in plan.resume.skipped:
            note(f"checkpoint {path} is unreadable ({why}); using {plan.resume.path.name} instead", "warning")
    if dry_run:
        if rank == 0:
            print(fileio.dumps({"ok": True, "world_size": world, "data": plan.ds.identity,
                                "train_rows": len(plan.ds.train_idx), "eval_rows": len(plan.ds.eval_idx),
                                "micro_batch_per_rank": plan.micro_batch}))
        return 0
    par = cfg.parallel
    ctx = ddist.setup(par.backend, par.device, par.timeout_s)
    metrics = NullMetrics()
    try:
        plan = setup.agree_resume(plan, ctx)     # collective: one resume step for every rank
        # A finished run's command run again: nothing to train, every output left as it is.
        # Decided on the agreed step, so inside the group: a rank whose own newest checkpoint
        # is the last step must not leave while a rank that lacks it resumes and trains.
        done = ckpt.finished(plan.resume, plan.total_steps, cfg.stop.target_loss) if plan.resume is not None else None
        if done:
            if rank == 0:
                note(f"this run already finished ({plan.resume.path} is {done}); nothing to train, outputs left "
                     f"as they are (--resume never trains afresh)")
            return 0
        metrics = setup.make_metrics(cfg, ctx)
        # The network's alpha and beta for the prediction: the bench file's, a probe's when
        # asked for (--probe), or none (the first step starts at once).
        net = predict.network(cfg.predict, cfg.model.layers, par.bucket_mb, ctx, bench)
        metrics.count_probe(predict.probe_traffic(net))  # its bytes, apart from the gradients'
        result, model = loop.train(setup.build(cfg, plan, ctx, metrics))
        result.update(predict.prediction(cfg.model.layers, par, ctx.world_size, net, result, cfg.predict))
        result["probe"] = predict.probe_traffic(net)
        if ctx.is_master and cfg.output.progress != "none":
            print_table(result)
        if ctx.is_master and cfg.output.output is not None:
            write_outputs(cfg.output.output, result, cfg.to_dict(), model)
        if cfg.metrics.pushgateway:
            metrics.push(cfg.metrics.pushgateway)
        if cfg.metrics.metrics_linger > 0 and metrics.registry is not None:
            time.sleep(cfg.metrics.metrics_linger)     # a feature: keeps /metrics up for a last scrape
        return 0
    except (loop.TrainingError, ckpt.NonFiniteError, ckpt.ReplicaMismatchError) as e:
        say(f"ddp-fnn: error: {e}")
        return 1
    except RuntimeError as e:                  # DistBackendError and Gloo's plain RuntimeErrors
        message = _collective_failure(e, ctx.rank, par.timeout_s)
        if message is None:
            raise
        say(f"ddp-fnn: error: {message}")
        return 1
    finally:
        metrics.close()
        ddist.teardown()


def _collective_failure(e: BaseException, rank: int, timeout_s: float) -> str | None:
    """The one-line message for a collective that failed because a peer died or froze,
    or None for any other error (which then propagates with its traceback)."""
    text = str(e).lower()
    if "timed out" in text or "timeout" in text:
        return (f"rank {rank}: a collective did not complete within --timeout-s {timeout_s:g} "
                f"(a peer died or froze?)")
    lost = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection refused")
    for s in lost:
        if s in text:
            return f"rank {rank}: a peer left the job during a collective ({s}{_peer_named_in(str(e))})"
    return None


def _peer_named_in(text: str) -> str:
    """' from 10.0.0.3 (node2)': the peer Gloo's message names by its address
    (``[10.0.0.3]:41234``), with the host name the resolver gives it (the container or
    namespace node), or '' when the message names none. The lookup gets 2 s: a resolver
    that does not answer must not hold up the exit."""
    m = re.search(r"\[([0-9a-fA-F:.]+)\]:\d+", text)
    if m is None:
        return ""
    address = m.group(1)
    found: list[str] = []
    lookup = threading.Thread(target=lambda: found.append(_host_name(address)), daemon=True)
    lookup.start()
    lookup.join(2.0)
    name = found[0] if found else ""
    return f" from {address}" + (f" ({name})" if name and name != address else "")


def _host_name(address: str) -> str:
    try:
        return socket.gethostbyaddr(address)[0]
    except OSError:
        return ""
