"""Flux.1 diffusion transformers (dev, schnell) for the unet service: see arch.py."""
