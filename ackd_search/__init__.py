"""ackd-search: AutoML search over ACKD (adversarial collaborative knowledge distillation) configurations."""

__version__ = "0.1.0"
