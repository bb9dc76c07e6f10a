"""Training: the one DiLoCo loop over a swarm of stage holders, and how its inner steps are carried out.

:class:`~neuroray.training.trainer.Trainer` owns rounds, snapshots, Proofs of Neural Work and the
recovery of restarted holders; a step executor (:mod:`neuroray.training.fixed` for fixed pipelines,
:mod:`neuroray.training.routed` for swarm routing, chosen from ``swarm.routing`` by :func:`~neuroray.training.run.run`)
runs the inner steps, gathers the outer step's pseudo-gradients and observes who did how much work.
:mod:`~neuroray.training.schedule` submits one pipeline's inner step; :mod:`~neuroray.training.metrics`
and :mod:`~neuroray.training.plots` report a run on Ray's dashboard and in its run directory;
:mod:`~neuroray.training.vocab_growth` grows the running swarm's vocabulary when its dataset is extended.
"""
