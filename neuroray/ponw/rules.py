"""NEURO reward, stake and slashing rules: pure integer arithmetic, no storage.

Money is integer micro-NEURO (``UNIT`` per NEURO) so that sums are exact and the supply invariant
``minted - burned == sum(balances) + sum(stakes)`` can be checked with ``==``. Per-item rates can be
far below one micro-NEURO (a fraction of a unit per inference token), so rates are kept in
``RATE_SCALE`` per NEURO and every reward is rounded down once, at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from neuroray.config import PonwConfig
from neuroray.errors import ConfigError

UNIT = 10**6  # micro-NEURO per NEURO: the ledger's integer money unit
RATE_SCALE = 10**12  # rates are stored in 1e-12 NEURO per item
BP = 10_000  # basis points
SYNC_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
# ponw.spot_check_tolerance=0 (auto). A float32 holder and the validator's float32 recompute run the same code
# (bit-identical in one process, benchmarks/spot_check_gap.py; only thread counts can reorder sums across
# processes), so 1e-3 leaves a wide margin and still catches a 0.5 % lie. Under bf16/fp16 autocast the recompute
# (float32) differs by the autocast's rounding: 1e-2 (at most 4.1e-5 measured on the CPU for the tiny and small
# models; not measured on a GPU).
FP32_SPOT_CHECK_TOLERANCE = 1e-3
AUTOCAST_SPOT_CHECK_TOLERANCE = 1e-2


def spot_check_tolerance(cfg: PonwConfig, float32_only: bool) -> float:
    """``ponw.spot_check_tolerance`` as given, or for 0 the one that fits how the holders compute
    (``float32_only``: every holder runs plain float32)."""
    if cfg.spot_check_tolerance > 0:
        return cfg.spot_check_tolerance
    return FP32_SPOT_CHECK_TOLERANCE if float32_only else AUTOCAST_SPOT_CHECK_TOLERANCE


def format_units(units: int) -> str:
    """Exact decimal rendering of micro-NEURO: ``1234567 -> '1.234567'``."""
    sign = "-" if units < 0 else ""
    whole, frac = divmod(abs(units), UNIT)
    return f"{sign}{whole}.{frac:06d}"


def parse_amount(text: str) -> int:
    """A positive NEURO amount given by a user (``'2.5'``) as micro-NEURO; ValueError if not."""
    try:
        value = Decimal(str(text).strip())
    except InvalidOperation:
        raise ValueError(f"amount {text!r} is not a number") from None
    if not value.is_finite():
        raise ValueError(f"amount {text!r} is not a finite number")
    if value <= 0:
        raise ValueError(f"amount {text} must be positive")
    units = value * UNIT
    if units != units.to_integral_value():
        raise ValueError(f"amount {text} has more than 6 decimals (1 micro-NEURO is the smallest unit)")
    return int(units)


def _rate(neuro: float) -> int:
    return int(round(neuro * RATE_SCALE))


def _units(neuro: float) -> int:
    return int(round(neuro * UNIT))


def _bp(fraction: float) -> int:
    return int(round(fraction * BP))


@dataclass(frozen=True)
class Rules:
    """The ledger's rules in integer form, built from a :class:`PonwConfig` by :meth:`from_config`."""

    max_proof_bytes: int = 4096
    timestamp_window_ms: int = 300_000
    rate_limit_per_hour: int = 120
    require_receipts: bool = True
    batch_layer_rate: int = _rate(0.001)
    embedding_bonus_bp: int = 2000
    lm_head_bonus_bp: int = 2000
    inference_token_rate: int = _rate(0.00001)
    validation_batch_rate: int = _rate(0.002)
    max_reward_per_proof: int = 10 * UNIT
    max_reward_per_day: int = 1000 * UNIT
    stake_bonus_max_bp: int = 5000
    stake_for_max_bonus: int = 100 * UNIT
    slash_bp: int = 5000
    slash_burn_bp: int = 5000
    free_rider_bp: int = 1000
    max_batches_per_s: float = 1000.0
    spot_check_rate: float = 0.1
    spot_check_tolerance: float = 0.01

    @classmethod
    def from_config(cls, cfg: PonwConfig) -> Rules:
        """Validate ``cfg`` and convert it; ConfigError naming the bad ``ponw.*`` key otherwise."""
        nonneg = ["reward_per_batch_layer", "embedding_bonus", "lm_head_bonus", "reward_per_inference_token",
                  "validation_fee_per_batch", "max_reward_per_proof", "max_reward_per_day",
                  "stake_for_max_multiplier", "free_rider_norm_fraction"]
        for key in nonneg:
            value = getattr(cfg, key)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"ponw.{key}={value} must be a finite number >= 0")
        for key in ("max_proof_bytes", "timestamp_window_s", "rate_limit_per_hour"):
            if getattr(cfg, key) <= 0:
                raise ConfigError(f"ponw.{key}={getattr(cfg, key)} must be positive")
        for key in ("slash_fraction", "slash_burn_fraction", "spot_check_rate", "hop_recheck_rate"):
            value = getattr(cfg, key)
            if not 0 <= value <= 1:
                raise ConfigError(f"ponw.{key}={value} must be in [0, 1]")
        if not (math.isfinite(cfg.stake_multiplier_max) and cfg.stake_multiplier_max >= 1):
            raise ConfigError(f"ponw.stake_multiplier_max={cfg.stake_multiplier_max} must be >= 1 (1 disables the bonus)")
        if cfg.straggler_factor is not None and not (
                math.isfinite(cfg.straggler_factor) and (cfg.straggler_factor == 0 or cfg.straggler_factor > 1)):
            raise ConfigError(f"ponw.straggler_factor={cfg.straggler_factor} must be above 1 (how many times slower "
                              "than its range's other holders a holder may be), 0 to turn the rule off, or null for the routing's default")
        if cfg.straggler_rounds < 1:
            raise ConfigError(f"ponw.straggler_rounds={cfg.straggler_rounds} must be at least 1")
        if cfg.call_clock_steps < 0:
            raise ConfigError(f"ponw.call_clock_steps={cfg.call_clock_steps} must be 0 (every step) or more")
        if not (math.isfinite(cfg.call_clock_poll_s) and cfg.call_clock_poll_s > 0):
            raise ConfigError(f"ponw.call_clock_poll_s={cfg.call_clock_poll_s} must be positive (seconds)")
        if not (math.isfinite(cfg.max_batches_per_s) and cfg.max_batches_per_s > 0):
            raise ConfigError(f"ponw.max_batches_per_s={cfg.max_batches_per_s} must be positive")
        if not (math.isfinite(cfg.spot_check_tolerance) and cfg.spot_check_tolerance >= 0):
            raise ConfigError(f"ponw.spot_check_tolerance={cfg.spot_check_tolerance} must be positive, or 0 (auto)")
        if cfg.synchronous.upper() not in SYNC_MODES:
            raise ConfigError(f"ponw.synchronous={cfg.synchronous!r} must be one of {SYNC_MODES}")
        if cfg.backend not in ("auto", "ecdsa", "coincurve"):
            raise ConfigError(f"ponw.backend={cfg.backend!r} must be auto, ecdsa or coincurve")
        return cls(
            max_proof_bytes=cfg.max_proof_bytes,
            timestamp_window_ms=cfg.timestamp_window_s * 1000,
            rate_limit_per_hour=cfg.rate_limit_per_hour,
            require_receipts=cfg.require_receipts,
            batch_layer_rate=_rate(cfg.reward_per_batch_layer),
            embedding_bonus_bp=_bp(cfg.embedding_bonus),
            lm_head_bonus_bp=_bp(cfg.lm_head_bonus),
            inference_token_rate=_rate(cfg.reward_per_inference_token),
            validation_batch_rate=_rate(cfg.validation_fee_per_batch),
            max_reward_per_proof=_units(cfg.max_reward_per_proof),
            max_reward_per_day=_units(cfg.max_reward_per_day),
            stake_bonus_max_bp=_bp(cfg.stake_multiplier_max - 1),
            stake_for_max_bonus=_units(cfg.stake_for_max_multiplier),
            slash_bp=_bp(cfg.slash_fraction),
            slash_burn_bp=_bp(cfg.slash_burn_fraction),
            free_rider_bp=_bp(cfg.free_rider_norm_fraction),
            max_batches_per_s=cfg.max_batches_per_s,
            spot_check_rate=cfg.spot_check_rate,
            # auto without knowing the holders (a ledger opened outside a run): the wider one
            spot_check_tolerance=spot_check_tolerance(cfg, float32_only=False),
        )

    # ----- rewards --------------------------------------------------------------------------
    def stake_multiplier_bp(self, stake: int) -> int:
        """``1 + bonus`` in basis points; the bonus grows linearly with stake and stops at its bound."""
        if stake <= 0 or self.stake_bonus_max_bp == 0:
            return BP
        if self.stake_for_max_bonus == 0 or stake >= self.stake_for_max_bonus:
            return BP + self.stake_bonus_max_bp
        return BP + self.stake_bonus_max_bp * stake // self.stake_for_max_bonus

    def base_reward(self, proof_type: str, batches: int, tokens: int, layers: int,
                    has_embedding: bool, has_lm_head: bool, stake: int) -> int:
        """Uncapped reward in micro-NEURO for verified work, including the role and stake multipliers.

        training: batches x layers held x rate x (1 + embedding/LM-head bonus);
        inference: tokens x rate; validation: recomputed batches x fee.
        """
        if proof_type == "training":
            role_bp = BP + self.embedding_bonus_bp * has_embedding + self.lm_head_bonus_bp * has_lm_head
            scaled = batches * layers * self.batch_layer_rate * role_bp
        elif proof_type == "inference":
            scaled = tokens * self.inference_token_rate * BP
        else:
            assert proof_type == "validation", proof_type
            scaled = batches * self.validation_batch_rate * BP
        # one floor division at the end: RATE_SCALE/UNIT, the role bp and the stake bp together
        return scaled * self.stake_multiplier_bp(stake) // (BP * BP * (RATE_SCALE // UNIT))

    def capped(self, reward: int, earned_today: int) -> int:
        """``reward`` limited by the per-proof cap and what is left of the node's daily cap."""
        return max(0, min(reward, self.max_reward_per_proof, self.max_reward_per_day - earned_today))

    # ----- slashing -------------------------------------------------------------------------
    def slash_split(self, stake: int, balance: int, has_reporter: bool) -> tuple[int, int, int, int]:
        """``(from_stake, from_balance, burned, to_reporter)`` of one slash.

        The slash is ``slash_fraction`` of everything the node holds, taken from stake first. Part is
        burned; the rest rewards the validator who caught it, or is burned too when there is none.
        """
        amount = (stake + balance) * self.slash_bp // BP
        from_stake = min(stake, amount)
        from_balance = amount - from_stake
        burned = amount * self.slash_burn_bp // BP if has_reporter else amount
        return from_stake, from_balance, burned, amount - burned
