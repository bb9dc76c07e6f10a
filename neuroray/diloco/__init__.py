"""DiLoCo's outer step, per layer range: pseudo-gradients in, robust aggregation, Nesterov SGD on theta0.

``aggregate`` + ``numerics`` (screening and the robust rules), ``attacks`` (simulated Byzantine
replicas), ``compress`` (fp16/int8 payloads, error feedback), ``outer`` (the outer optimizer),
``streaming`` (fragments), ``lr`` (the inner learning-rate schedule), ``sync`` (the Ray task that
runs one range's outer step, and ``OuterSync``, which owns every range's theta0 and momentum).
"""
