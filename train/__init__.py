"""``python -m train``: fine-tune FLUX.1 Kontext into an Edit2Perceive perceiver."""
