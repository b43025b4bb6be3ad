"""Luna Stack: one resident copy of CLIP, VAE and UNet per GPU, shared by many ComfyUI instances."""
