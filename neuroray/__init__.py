"""neuroray: train a language model across a swarm of Ray stage actors with DiLoCo."""

__version__ = "0.1.0"
