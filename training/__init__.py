"""Nano Qwen-VL training and its held-out evaluation (CPU, synthetic scenes).

Kept out of ``models/`` so the reference package stays what the exporters load: training
monkey-patches the reference's attention (``train_nano.fast_attention``) and evaluation scores
with ``validate.metrics``, neither of which the reference itself may depend on.
"""
