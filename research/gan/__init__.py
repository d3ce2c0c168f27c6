"""GANs: non-saturating / hinge / WGAN-GP objectives (``losses``), MLP generator and projection
discriminator (``nets``), the multi-model training pieces (``train``) and the 2-D Wasserstein-1
check of a WGAN-GP critic (``toy``)."""
