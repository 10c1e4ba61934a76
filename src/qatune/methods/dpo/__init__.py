"""Direct preference optimization (`method: dpo`): the policy against a frozen reference on
chosen/rejected pairs. `loss` holds the losses and metrics, `step` one pair batch's forward
through the fused LM head, `method` the data plan, the reference cache and the step."""

from qatune.methods.dpo.method import DPO

__all__ = ["DPO"]
