"""Losses of the students: knowledge distillation from a frozen teacher (``kd``), one method per module. The
teacher's anchor alignment lives with the networks (``nnalign.networks.anchors``), whose parameters it trains."""
