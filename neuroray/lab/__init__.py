"""The multi-host lab: N emulated hosts on this machine, each with its own network namespace and address on a
private bridge, its own disk (HOME, cache, /tmp) and its own Ray node, joined by kernel-shaped links that can
be cut. Features that move data between holders are tested here. See docs/lab.md.
"""

from neuroray.lab.config import LabConfig, load_lab_config
from neuroray.lab.control import attach, command, cut, down, heal, host_index, shape, status, up
from neuroray.lab.links import counters

__all__ = ["LabConfig", "load_lab_config", "up", "down", "status", "cut", "heal", "shape", "command", "attach",
           "host_index", "counters"]
