"""The frozen encoders' outputs per training item, computed once (:class:`FrozenCache`)."""

from __future__ import annotations


class FrozenCache:
    """The frozen encoders' outputs per training item: VAE posterior mean/std and text embedding.

    The VAE encoder and text encoder are frozen, so what they give for an item never changes:
    each item is encoded once, alone (batch 1, so the value does not depend on the batch it first
    came in and a resumed run sees the same numbers), and reused at every later epoch. The
    latent is then drawn as ``mean + std * randn(generator)``, exactly as diffusers'
    ``DiagonalGaussianDistribution.sample``. At the tiny scale the 12-layer text encoder costs
    more than the U-Net's training step; this removes it after the first epoch.
    """

    def __init__(self, components, device, latents: bool, text: bool):
        self.c, self.device, self.latents, self.text = components, device, latents, text
        self.items: dict[int, tuple] = {}

    def _encode(self, pixels, ids):
        import torch

        mean = std = ehs = None
        if self.latents:
            dist = self.c.vae.encode(pixels[None].to(self.device, dtype=torch.float32)).latent_dist
            mean, std = dist.mean[0], dist.std[0]
        if self.text:
            ehs = self.c.text_encoder(ids[None].to(self.device))[0][0].float()
        return mean, std, ehs

    def get(self, batch):
        import torch

        idx = batch["index"].tolist()
        for k, i in enumerate(idx):
            if i not in self.items:
                self.items[i] = self._encode(batch["pixel_values"][k], batch["input_ids"][k])
        rows = [self.items[i] for i in idx]
        stack = [torch.stack([r[j] for r in rows]) if rows[0][j] is not None else None for j in range(3)]
        return stack[0], stack[1], stack[2]
