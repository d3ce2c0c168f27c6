"""Generative methods as small classes behind one registry.

    from research.generative.methods import METHODS, get_method
    m = get_method("vp", sigma_data=0.5)          # vp | subvp | ve | edm | rf | icfm | otcfm
    loss, aux = m.loss(model_fn, params, x0, key, cond=labels)
    x, nfe = m.sample(model_fn, params, key, shape, sampler="dpmpp_2m", num_steps=10, cond=labels)
    logp, aux = m.log_likelihood(model_fn, params, x, divergence="exact")

Protocol and registry: ``base.py``; families: ``score_sde.py`` (VP, sub-VP, VE), ``edm.py``,
``flow.py`` (rectified flow, I-CFM, OT-CFM). ``model_fn(params, x, t, cond, key)`` everywhere;
for CFG pass ``research.generative.guidance.guided_model_fn(model_fn, null, w)`` as ``model_fn``.
"""
from research.generative.methods.base import METHODS, Method, get_method, register_method
from research.generative.methods.edm import EDM
from research.generative.methods.flow import ICFM, OTCFM, RectifiedFlow
from research.generative.methods.score_sde import VE, VP, SubVP

__all__ = ["METHODS", "Method", "get_method", "register_method", "VP", "SubVP", "VE", "EDM", "RectifiedFlow",
           "ICFM", "OTCFM"]
