"""big_vision_like: ViT / Swin / Perceiver IO encoders in JAX + Flax NNX, one trainer for
supervised, CLIP, SigLIP, MAE and DINO / iBOT objectives (see README.md)."""
