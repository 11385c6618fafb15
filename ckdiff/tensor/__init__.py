"""Tensor views shared by every format: the block-scaled protocol (``blockscaled``)."""
