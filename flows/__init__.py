"""Prefect flows: `train` (flows/train.py, "train-product-model") and `promote`
(flows/promote.py, "promote-product-model"). Flows only compose tasks."""
