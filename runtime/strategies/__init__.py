"""Decoding strategies, one module per family, each a function of (model, inputs, config, ...)."""
