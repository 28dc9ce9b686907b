"""CROWN-IBP (Zhang et al. 2020) and Shi et al. 2021's fast IBP training, on the project's bound engine.

``crown-ibp`` trains on β·CROWN-IBP + (1 − β)·IBP margin bounds with CROWN-IBP's DM-large configs;
``crown-ibp-fast`` is Shi et al.'s CNN-7 with BatchNorm, IBP initialisation, warm-up regularisers and a
short warm-up, training on IBP bounds (their headline; the ℓ∞-dist paper lists it as "CROWN-IBP (Shi et
al. 2021)"). Both use the recipe and protocol shared with ``methods.ibp``.
"""

from methods.base import MethodCard, register
from methods.crown_ibp.method import BoundTrainedCNN


@register("crown-ibp")
class CrownIbp(BoundTrainedCNN):
    card = MethodCard(
        title="CROWN-IBP",
        paper="Towards Stable and Efficient Training of Verifiably Robust Neural Networks",
        venue="ICLR 2020",
        architecture="DM-large (paper); DM-small / DM-medium at reduced scales",
        reference_label="CROWN-IBP",
        reference_source="(Zhang et al. 2020)",
    )
    fixed = {"beta_start": 1.0}


@register("crown-ibp-fast")
class CrownIbpFast(BoundTrainedCNN):
    card = MethodCard(
        title="Fast certified training (IBP init + BN + warm-up regularisers)",
        paper="Fast Certified Robust Training with Short Warmup",
        venue="NeurIPS 2021",
        architecture="CNN-7 (DM-large + BatchNorm); narrower CNN-7 at reduced scales",
        reference_label="CROWN-IBP",
        reference_source="(Shi et al. 2021)",
    )
