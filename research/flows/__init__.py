"""Normalizing flows: bijectors (NICE, RealNVP, Glow layers), class-conditional image flows with exact
likelihood, and a free-form continuous normalizing flow (FFJORD-style) in ``research.flows.cnf``."""
