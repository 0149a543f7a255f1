"""The gated delta rule (Gated DeltaNet; Yang, Kautz, Hatamizadeh, ICLR 2025) in chunked form.

S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T, o_t = scale q_t S_t, with the state in and
out and packed segments. Public entry points live in api.py; reference.py is the oracle.
"""

from effattn.kernels.delta_rule.api import FAMILY, delta_rule, delta_rule_step

__all__ = ["FAMILY", "delta_rule", "delta_rule_step"]
