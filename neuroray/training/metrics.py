"""Training metrics on the Ray dashboard (``ray.util.metrics``), exported through Ray's Prometheus endpoint.

All names start with ``neuroray_``. The driver records them as the loop runs; Ray's metrics agent on each
node exposes them at ``http://<node>:<metrics_export_port>/metrics`` next to Ray's own, which is what the
dashboard's Grafana panels and any Prometheus scrape read.
"""

from __future__ import annotations

import time

from ray.util.metrics import Counter, Gauge, Histogram


class TrainMetrics:
    """Driver-side metrics of one training run (tagged with the run name)."""

    def __init__(self, run: str):
        tags = ("run",)
        self.run = run
        self.loss = Gauge("neuroray_loss", "mean training loss of the last inner step", tags)
        self.tokens_per_s = Gauge("neuroray_tokens_per_s", "training tokens per second since the start", tags)
        self.inner_step = Gauge("neuroray_inner_step", "inner steps completed", tags)
        self.outer_round = Gauge("neuroray_outer_round", "outer DiLoCo rounds completed", tags)
        self.step_seconds = Histogram("neuroray_step_seconds", "wall time per inner step",
                                      [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30], tags)
        self.utilisation = Gauge("neuroray_holder_utilisation", "busy time / wall time of a stage holder",
                                 ("run", "holder"))
        self.queue_depth = Gauge("neuroray_holder_queue_depth", "microbatches in flight at a stage holder",
                                 ("run", "holder"))
        self.failovers = Counter("neuroray_failovers_total", "replicas recovered after a holder died (fixed routing) "
                                 "or hops finished on another holder (swarm routing)", tags)
        self.rejected = Counter("neuroray_contributions_rejected_total", "pseudo-gradients rejected by the outer step",
                                ("run", "reason"))
        self.balance = Gauge("neuroray_neuro_balance", "NEURO balance of a node in the ledger", ("run", "node"))
        self.sync_bytes = Counter("neuroray_sync_bytes_total", "bytes counted crossing for DiLoCo synchronisation "
                                  "(kind: payload = pseudo-gradients, broadcast = theta0 or updates, control)",
                                  ("run", "kind"))
        self.hop_bytes = Counter("neuroray_hop_bytes_total", "bytes a stage holder sent to its neighbours: "
                                 "activations forward and their gradients back, as encoded", ("run", "holder"))
        self._hop_seen: dict[str, int] = {}  # holder -> its hop bytes at the previous read
        self.hop_rejections = Counter("neuroray_hop_rejections_total", "activations and gradients a holder rejected "
                                      "(neuroray/swarm/hop_guard.py), by the holder that sent them and the check failed",
                                      ("run", "sender", "check"))
        self.stragglers = Counter("neuroray_stragglers_total", "rounds a holder was paid 0 as a straggler "
                                  "(neuroray/ponw/stragglers.py)", ("run", "holder"))
        self.copies = Counter("neuroray_copies_total", "holders that sent another holder's pseudo-gradient as their "
                              "own (neuroray/training/copies.py), paid 0; outcome: copied (author named) or "
                              "undecided (no author by the margin: the whole group unpaid)", ("run", "outcome"))
        self.eval_loss = Gauge("neuroray_eval_loss", "held-out eval loss of theta0 at the last evaluation", tags)
        self.eval_perplexity = Gauge("neuroray_eval_perplexity", "exp(eval loss) at the last evaluation", tags)
        self.snapshot_age = Gauge("neuroray_snapshot_age_seconds", "seconds since the last complete snapshot set", tags)
        self._last_snapshot = time.monotonic()

    def _t(self, **extra) -> dict:
        return {"run": self.run, **extra}

    def step(self, step: int, loss: float, tokens_per_s: float, seconds: float) -> None:
        self.loss.set(loss, self._t())
        self.tokens_per_s.set(tokens_per_s, self._t())
        self.inner_step.set(step, self._t())
        self.step_seconds.observe(seconds, self._t())
        self.snapshot_age.set(time.monotonic() - self._last_snapshot, self._t())

    def evaluation(self, loss: float, perplexity: float) -> None:
        self.eval_loss.set(loss, self._t())
        self.eval_perplexity.set(perplexity, self._t())

    def round(self, rounds: int, rejected_reasons: list[str]) -> None:
        self.outer_round.set(rounds, self._t())
        for reason in rejected_reasons:
            self.rejected.inc(1, self._t(reason=reason.split(" (")[0][:60]))

    def comm(self, counted: dict) -> None:
        for kind in ("payload", "broadcast", "control"):
            if counted[f"{kind}_bytes"] > 0:  # Ray's Counter refuses 0
                self.sync_bytes.inc(counted[f"{kind}_bytes"], self._t(kind=kind))

    def holders(self, stats: list[dict]) -> None:
        for s in stats:
            self.utilisation.set(s["utilisation"], self._t(holder=s["name"]))
            self.queue_depth.set(s["in_flight"], self._t(holder=s["name"]))
            # a holder started afresh (recovery) counts from zero again: its whole count is new bytes
            seen, now = self._hop_seen.get(s["name"], 0), s["hop_bytes"]
            new = now - seen if now >= seen else now
            if new > 0:  # Ray's Counter refuses 0
                self.hop_bytes.inc(new, self._t(holder=s["name"]))
            self._hop_seen[s["name"]] = now

    def hop_rejected(self, sender: str, check: str) -> None:
        self.hop_rejections.inc(1, self._t(sender=sender, check=check))

    def straggler(self, holder: str) -> None:
        self.stragglers.inc(1, self._t(holder=holder))

    def copied(self, count: int, outcome: str) -> None:
        if count > 0:  # Ray's Counter refuses 0
            self.copies.inc(count, self._t(outcome=outcome))

    def failover(self) -> None:
        self.failovers.inc(1, self._t())

    def snapshot_taken(self) -> None:
        self._last_snapshot = time.monotonic()
        self.snapshot_age.set(0.0, self._t())

    def balances(self, balances: dict[str, float]) -> None:
        for node, amount in balances.items():
            self.balance.set(amount, self._t(node=node[:16]))
