"""LabConfig: how many emulated hosts, their addresses, link rates and every timeout, from ``key=value``.

Kept apart from ``neuroray.config`` on purpose: the lab is an operator's tool (root, namespaces) and must
not pull in the training schema, nor change when it does. Overrides may be written ``hosts=4`` or
``lab.hosts=4``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass, fields

from neuroray.errors import ConfigError

# tc's own rate syntax, so what the user types is what `tc qdisc show` prints back (modulo units)
_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit|bps|kbps|mbps|gbps|tbps)$")
_RATE_SCALE = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
               "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9, "tbps": 8e12}
UNSHAPED = ("", "none", "off", "unshaped")


def rate_bits(rate: str) -> int:
    """``100mbit`` -> 100_000_000 bits/s; raises ConfigError naming the accepted forms."""
    m = _RATE.match(rate.strip().lower())
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"rate {rate!r} is not a tc rate; write e.g. 20mbit, 100mbit, 1gbit, or none to unshape")
    return int(float(m.group(1)) * _RATE_SCALE[m.group(2)])


def normalize_rate(rate: str | None) -> str | None:
    """None for 'unshaped' spellings, else the validated rate string (lower case)."""
    if rate is None or str(rate).strip().lower() in UNSHAPED:
        return None
    rate_bits(str(rate))
    return str(rate).strip().lower()


@dataclass
class LabConfig:
    hosts: int = 3
    subnet: str = "10.231.0.0/24"  # host i gets .i+1, the bridge (the machine itself) the last usable address
    prefix: str = "nr"  # names: <prefix>br0 bridge, <prefix>h<i> namespace, <prefix>v<i> veth; down discovers by it
    rate: str | None = None  # both directions of every host's link; None = unshaped
    upload: str | None = None  # host -> bridge, overrides rate for that direction
    download: str | None = None  # bridge -> host, overrides rate for that direction
    burst_ms: float = 10.0  # tbf bucket = this much traffic at the rate (never below 64 KiB, see links.py)
    queue_latency_ms: float = 50.0  # tbf queue: packets waiting longer than this are dropped, as on a real link
    lab_dir: str = "/tmp/neuroray-lab"  # state.json, the auth token and every host's disk live here
    host_root: str = "/run/neuroray-host"  # inside a host: its own disk is bind-mounted here (HOME, cache)
    ray: bool = True  # start one Ray node per host (host 0 the head)
    ray_port: int = 6379  # ports are per network namespace, so the defaults cannot clash with another Ray
    dashboard_port: int = 8265
    num_cpus: int = 2  # logical CPUs each Ray node advertises; all hosts share this machine's cores
    object_store_mb: int = 256  # per host; bounded so N hosts do not each reserve 30% of RAM
    # fits-in-memory check: an idle head measured ~640 MiB PSS, a worker node ~180 MiB, plus its object store
    memory_per_host_mb: int = 700
    ray_start_timeout_s: float = 180.0
    nodes_alive_timeout_s: float = 120.0
    command_timeout_s: float = 30.0  # any ip/tc/mount call
    kill_grace_s: float = 5.0  # SIGTERM, then SIGKILL after this long

    def host_names(self) -> list[str]:
        return [f"h{i}" for i in range(self.hosts)]

    def netns(self, i: int) -> str:
        return f"{self.prefix}h{i}"

    def veth(self, i: int) -> str:
        return f"{self.prefix}v{i}"

    @property
    def bridge(self) -> str:
        return f"{self.prefix}br0"

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.ip_network(self.subnet, strict=True)

    def host_ip(self, i: int) -> str:
        return str(self.network.network_address + i + 1)

    @property
    def bridge_ip(self) -> str:
        return str(self.network.broadcast_address - 1)

    @property
    def head_address(self) -> str:
        return f"{self.host_ip(0)}:{self.ray_port}"

    def upload_rate(self) -> str | None:
        return self.upload if self.upload is not None else self.rate

    def download_rate(self) -> str | None:
        return self.download if self.download is not None else self.rate

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def validate(cfg: LabConfig) -> None:
    try:
        net = cfg.network
    except ValueError as exc:
        raise ConfigError(f"subnet={cfg.subnet} is not an IPv4 network ({exc}); write e.g. 10.231.0.0/24") from None
    if net.version != 4 or not net.is_private:
        raise ConfigError(f"subnet={cfg.subnet} must be a private IPv4 network: the lab talks only to its own "
                          "addresses")
    if cfg.hosts < 1:
        raise ConfigError(f"hosts={cfg.hosts} must be >= 1")
    if cfg.hosts > net.num_addresses - 3:  # network, broadcast and the bridge's address are taken
        raise ConfigError(f"hosts={cfg.hosts} does not fit in subnet={cfg.subnet}: at most {net.num_addresses - 3}")
    if not re.fullmatch(r"[a-z]{1,4}", cfg.prefix):
        raise ConfigError(f"prefix={cfg.prefix!r} must be 1-4 lower-case letters (interface names are <= 15 bytes)")
    for key in ("rate", "upload", "download"):
        setattr(cfg, key, normalize_rate(getattr(cfg, key)))
    for f in fields(cfg):
        if f.name.endswith(("_s", "_mb", "_ms", "_port")) and getattr(cfg, f.name) <= 0:
            raise ConfigError(f"{f.name}={getattr(cfg, f.name)} must be positive")
    if cfg.num_cpus < 0:
        raise ConfigError(f"num_cpus={cfg.num_cpus} must be >= 0")
    if not cfg.lab_dir.startswith("/") or not cfg.host_root.startswith("/"):
        raise ConfigError("lab_dir and host_root must be absolute paths")
    if cfg.host_root.rstrip("/") in ("/tmp", "") or cfg.host_root.startswith("/tmp/"):
        # each host gets a private /tmp too, mounted after host_root: a host_root under /tmp would be hidden
        raise ConfigError(f"host_root={cfg.host_root} must not be under /tmp (each host's /tmp is replaced)")


def _coerce(name: str, typ, raw: str):
    if typ in ("int", int):
        return int(raw)
    if typ in ("float", float):
        return float(raw)
    if typ in ("bool", bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {raw}")
    return raw


def load_lab_config(overrides: list[str] | tuple[str, ...] = (), base: dict | None = None) -> LabConfig:
    """Build a LabConfig from ``base`` (a saved lab's config) and ``key=value`` / ``lab.key=value`` overrides."""
    known = {f.name: f.type for f in fields(LabConfig)}
    values = dict(base or {})
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().removeprefix("lab.")
        if not sep or key not in known:
            raise ConfigError(f"unknown lab override {item!r}; known keys: {', '.join(known)}")
        try:
            values[key] = _coerce(key, known[key].split(" | ")[0] if isinstance(known[key], str) else known[key], raw)
        except ValueError as exc:
            raise ConfigError(f"lab override {item!r}: {exc}") from None
    cfg = LabConfig(**{k: v for k, v in values.items() if k in known})
    validate(cfg)
    return cfg
