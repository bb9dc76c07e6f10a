"""neuroray: train a language model across a swarm of Ray stage actors with DiLoCo.

Packages, bottom to top: ``config`` (the schema) and ``errors``; ``model``, ``genesis`` (data),
``diloco``, ``ponw`` (proofs and the ledger), ``planner``; ``swarm`` (the holder actors and the
router); ``inference``; ``training`` (the one loop and a whole run); ``cli`` (the thin
``python -m neuroray.<cmd>`` entry points). docs/architecture.md maps every module.
"""

__version__ = "0.1.0"
