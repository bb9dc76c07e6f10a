"""Planning: size the model from cluster memory, split it into stages, and place the holders with Ray.

* :mod:`~neuroray.planner.scaling` -- the scaling law (memory -> architecture) and parameter counts;
* :mod:`~neuroray.planner.memory` -- bytes per holder (weights, gradients, AdamW, DiLoCo, activations);
* :mod:`~neuroray.planner.plan_types` -- the values: :class:`PlanRequest`, :class:`NodeSpec`, :class:`Plan`;
* :mod:`~neuroray.planner.search` -- :func:`plan` (pure): device, architecture, stage count, replicas;
* :mod:`~neuroray.planner.partition` -- layers -> stages, by dynamic programming over layer costs;
* :mod:`~neuroray.planner.assign` -- replicas -> nodes, holder by holder;
* :mod:`~neuroray.planner.cluster` -- node specs from Ray or ``cluster.nodes``, :func:`plan_for_cluster`,
  the upgrade rule and :class:`ClusterWatcher`;
* :mod:`~neuroray.planner.placement` -- Ray placement groups for a plan;
* :mod:`~neuroray.planner.upgrade` -- the trainer's watch between rounds: live growth and added replicas;
* :mod:`~neuroray.planner.expand` -- where replicas of the running model go (joins, ``resume=true``);
* :mod:`~neuroray.planner.report` -- a plan as text (``python -m neuroray.plan``).
"""

from neuroray.planner.cluster import (
    ClusterWatcher,
    UpgradeRule,
    WatchEvent,
    cluster_nodes,
    parse_nodes,
    plan_for_cluster,
    request_from_config,
)
from neuroray.planner.memory import parse_memory
from neuroray.planner.plan_types import NodeSpec, Plan, PlanError, PlanRequest
from neuroray.planner.search import plan
from neuroray.planner.scaling import architecture_for_memory, param_count

__all__ = [
    "ClusterWatcher",
    "NodeSpec",
    "Plan",
    "PlanError",
    "PlanRequest",
    "UpgradeRule",
    "WatchEvent",
    "architecture_for_memory",
    "cluster_nodes",
    "param_count",
    "parse_memory",
    "parse_nodes",
    "plan",
    "plan_for_cluster",
    "request_from_config",
]
