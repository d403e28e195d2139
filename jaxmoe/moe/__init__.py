"""Mixture-of-Experts: routing, dispatch, expert computation and the MoE block."""
