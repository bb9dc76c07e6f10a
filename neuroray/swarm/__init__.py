"""The swarm: stage-holder actors and the microbatch schedule that drives them."""
