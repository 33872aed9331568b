"""UIFace: identity-conditioned diffusion with two-stage sampling and attention injection (Lin et al. 2025)."""
