"""IBP (Gowal et al. 2018) with the CROWN-IBP code base's practical recipe (spec §4.2): the CROWN-IBP
configs with the bound switched to pure IBP (β ≡ 0), keeping their κ mixing (1 → 0.5 on MNIST, κ ≡ 0
on CIFAR). These runs are what the ℓ∞-dist paper's "IBP (Gowal et al. 2018)" rows report (its * note:
taken from Zhang et al. 2020)."""

from methods.base import MethodCard, register
from methods.crown_ibp.method import BoundTrainedCNN


@register("ibp")
class Ibp(BoundTrainedCNN):
    card = MethodCard(
        title="IBP",
        paper="On the Effectiveness of Interval Bound Propagation for Training Verifiably Robust Models",
        venue="arXiv 2018 (Gowal et al.)",
        architecture="DM-large (paper); DM-small / DM-medium at reduced scales",
        reference_label="IBP",
        reference_source="(Gowal et al. 2018)",
    )
    fixed = {"beta_start": 0.0, "beta_end": 0.0}
