"""Flow matching on the rectified-flow path x_t = (1 - t) x0 + t x1 (data at t = 0).

``rf``     rectified flow, exactly ``losses.rectified_flow_loss`` (SD3; logit-normal t by default,
           ``timestep_dist="uniform"`` for Liu et al.'s original uniform t).
``icfm``   I-CFM (Tong et al. 2023): path width ``sigma`` > 0, independent coupling.
``otcfm``  OT-CFM: the same with the exact minibatch W2 coupling (on-device Hungarian).
The network predicts the velocity ``x1 - x0``; the EDM view is ``D = x_t - t v`` at
``x = x_t / (1 - t)``, ``sigma = t / (1 - t)``, which makes the sigma-space ODE exactly the flow's
ODE for any coupling (when ``sigma = 0``). Sampling starts at ``t_max`` < 1 in sigma space
(sigma_max = t_max / (1 - t_max)), or at t = 1 with the time-space integrators.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from research.generative import losses as L
from research.generative import sampling
from research.generative.methods.base import Method, register_method
from research.generative.paths import RectifiedFlowPath
from research.generative.timesteps import TIMESTEP_DISTS


@dataclasses.dataclass(frozen=True)
class _Flow(Method):
    timestep_dist: str = "logit_normal"
    t_max: float = 0.999
    t_min_sample: float = 1e-3

    time: ClassVar[str] = "t"

    def __post_init__(self):
        if self.timestep_dist not in TIMESTEP_DISTS:
            raise ValueError(f"{self.name}: unknown timestep_dist {self.timestep_dist!r}; "
                             f"expected one of {TIMESTEP_DISTS}")
        if not 0 < self.t_min_sample < self.t_max < 1:
            raise ValueError(f"{self.name}: need 0 < t_min_sample < t_max < 1, got {self.t_min_sample}, {self.t_max}")

    @property
    def path(self):
        return RectifiedFlowPath()

    def model_prediction(self) -> str:
        return "velocity"

    def sigma_range(self):
        lo, hi = self.t_min_sample, self.t_max
        return lo / (1.0 - lo), hi / (1.0 - hi)

    def sigmas(self, num_steps: int, schedule: str = "karras", **kw):
        """Also ``schedule="shift"`` (or ``"shift:<s>"``): SD3's time shift of a uniform t grid from ``t_max``,
        shift 3.0 by default (``sampling.flow_sigmas``)."""
        shift = _shift_of(schedule)
        if shift is None:
            return super().sigmas(num_steps, schedule, **kw)
        return sampling.flow_sigmas(num_steps, shift=shift, t_max=self.t_max, **kw)

    def time_grid(self, num_steps: int, grid: str = "uniform", dtype=None):
        """Also ``grid="shift"`` / ``"shift:<s>"``: the shifted uniform grid from t = 1 to 0."""
        shift = _shift_of(grid)
        if shift is None:
            return super().time_grid(num_steps, grid, **({} if dtype is None else {"dtype": dtype}))
        return sampling.shift_time(sampling.uniform_time(num_steps, 1.0, 0.0, dtype=dtype), shift)


def _shift_of(schedule: str):
    """3.0 for "shift", s for "shift:<s>", None for any other schedule name."""
    if schedule == "shift":
        return 3.0
    if schedule.startswith("shift:"):
        try:
            return float(schedule.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"schedule {schedule!r}: expected shift:<number>") from None
    return None


@register_method("rf")
@dataclasses.dataclass(frozen=True)
class RectifiedFlow(_Flow):
    loc: float = 0.0
    scale: float = 1.0
    name: ClassVar[str] = "rf"

    def loss(self, model_fn, params, x0, key, *, cond=None):
        return L.rectified_flow_loss(model_fn, params, x0, key, cond=cond, timestep_dist=self.timestep_dist,
                                     loc=self.loc, scale=self.scale)


@dataclasses.dataclass(frozen=True)
class _CFM(_Flow):
    sigma: float = 0.1
    timestep_dist: str = "uniform"
    coupling: ClassVar[str] = "independent"

    def __post_init__(self):
        super().__post_init__()
        if not self.sigma >= 0:
            raise ValueError(f"{self.name}: sigma must be >= 0, got {self.sigma}")

    def loss(self, model_fn, params, x0, key, *, cond=None):
        return L.cfm_loss(model_fn, params, x0, key, cond=cond, sigma=self.sigma, timestep_dist=self.timestep_dist,
                          coupling=self.coupling)


@register_method("icfm")
@dataclasses.dataclass(frozen=True)
class ICFM(_CFM):
    name: ClassVar[str] = "icfm"


@register_method("otcfm")
@dataclasses.dataclass(frozen=True)
class OTCFM(_CFM):
    name: ClassVar[str] = "otcfm"
    coupling: ClassVar[str] = "ot"
