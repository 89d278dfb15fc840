"""Small reusable modules of the 3D Transformer."""
