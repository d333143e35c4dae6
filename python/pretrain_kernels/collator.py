"""pretrain_kernels.collator.MLMCollator: kept for old imports; the collator lives in
pretrain_kernels.integrations.collator."""
from .integrations.collator import MLMCollator

__all__ = ["MLMCollator"]
