"""saesteer: rank SAE features by input and output score, and steer a language model with them."""

__version__ = "0.1.0"
