"""Train the DetailFlow VQ tokenizer (official ``train/train_tokenizer.py`` semantics, plain PyTorch).

    python -m detailflow_ref.train_tokenizer --results-dir out/tokenizer --data fashion-mnist \\
        --image-size 32 --encoder-patch-size 4 --decoder-patch-size 4 --num-latent-tokens 32 \\
        --group-size 4 --codebook-size 1024 --encoder-model siglip2_custom_L4_D128_H4 \\
        --decoder-model siglip2_custom_L4_D128_H4 --global-batch-size 256 --max-steps 2000

Several processes: ``python -m torch.distributed.run --nproc-per-node N -m detailflow_ref.train_tokenizer ...``
(gloo on CPU, nccl on GPU; --global-batch-size is split over the ranks).

One training step (for each batch, as the official trainer does):

1. **Resolution degradation.** T = the schedule's token count for the image size. With
   probability ``degradation_prob`` draw t uniformly in 1..T-g, rounded up to a multiple of g
   when t > causal_num; the target is the image resized to res(t) ('area') and back up to the
   decode size of t (bicubic), and the decoder renders the first t tokens at that size.
   Otherwise t = T and the target is the image. The encoder always encodes T tokens.
2. **Self-correction** (``correction_training``, whenever t > 1). Draw noise_idx: uniform in
   [0, t) if t <= causal_num, else uniform in [0, t-g) floored to a group start when
   >= causal_num. Positions [noise_idx, noise_end) (one token before causal_num, one group after)
   get a random code among the ``--correction-top-k`` (official 50) nearest codewords of the
   clean latent (the nearest included). The encoder runs again with latent inputs
   ``refine_conv(perturbed prefix)`` on [0, noise_end) and ``refined_tokens`` after; the
   corrected sequence is the perturbed prefix (detached) followed by the re-encoded codes.
   Clean and corrected sequences are both decoded (batch doubled, target repeated).
3. **Losses.** L2 (or L1) reconstruction * reconstruction_weight; VQ codebook + beta-weighted
   commitment losses with the straight-through estimator, weighted clean : corrected as
   T : (T - noise_end) over (2T - noise_end) and taken on the corrected pass only from
   noise_end on (official encode_image); optional entropy loss; optional perceptual loss
   (hook) and PatchGAN hinge loss (after --disc-start).

Optimizer: Adam (official default; ``--optimizer adamw`` uses weight decay on >= 2-D weights),
base LR scaled by global_batch_size / 256 like the official (``--no-scale-lr`` to disable),
warmup then cosine down to 0.1 x LR (official min_lr), gradient clipping, optional EMA.
Checkpoints: ``<results-dir>/checkpoints/<steps>.pt`` = {'model', 'optimizer', 'steps', 'args'}
+ 'ema' (with --ema) + 'discriminator', 'optimizer_disc' (with --disc-weight > 0).
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from detailflow_engine.config import TokenizerConfig

from . import train_common as tc
from .losses import (PatchDiscriminator, PerceptualLoss, build_perceptual_net, entropy_loss, hinge_d_loss,
                     hinge_g_loss, reconstruction_loss, vq_losses)
from .datasets import load_dataset_tensors
from .datasets import synthetic_images as _synthetic_images  # noqa: F401 (the trainer tests' name)
from .self_correction import noise_span, noise_token_index, self_correction_encode
from .tokenizer import VQModel, resize_images

# Official ModelArgs (modelling/tokenizer.py) fields in declaration order with their defaults.
OFFICIAL_TOKENIZER_MODEL_ARGS = {
    "image_size": 256, "max_image_size": 256, "codebook_size": 16384, "codebook_embed_dim": 8,
    "codebook_l2_norm": True, "codebook_show_usage": True, "commit_loss_beta": 0.25,
    "entropy_loss_ratio": 0.0, "vq_loss_ratio": 1.0, "kl_loss_weight": 1e-06, "tau": 0.1, "num_codebooks": 1,
    "encoder_ch_mult": [1, 1, 2, 2, 4], "decoder_ch_mult": [1, 1, 2, 2, 4], "z_channels": 256, "dropout_p": 0.0,
    "enc_type": "cnn", "dec_type": "cnn", "encoder_model": "llamagen_encoder", "decoder_model": "llamagen_decoder",
    "num_latent_tokens": 256, "enc_tuning_method": "full", "dec_tuning_method": "full",
    "enc_pretrained": True, "dec_pretrained": False, "enc_patch_size": 16, "dec_patch_size": 16,
    "enc_drop_path_rate": 0.0, "dec_drop_path_rate": 0.0, "repa": False, "repa_patch_size": 16,
    "repa_model": "vit_base_patch16_224", "repa_proj_dim": 2048, "repa_layer_indices": 1, "repa_loss_weight": 0.1,
    "repa_align": "global", "vq_mean": 0.0, "vq_std": 1.0, "causal_encoder": False, "causal_decoder": True,
    "gradient_checkpointing_encoder": False, "gradient_checkpointing_decoder": False, "group_size": 1,
    "causal_num": None, "global_token_loss_weight": 0.0, "correction_training": True,
}


# --------------------------------------------------------------------------- configs


def tokenizer_model_args(args: argparse.Namespace) -> dict:
    """The full official ModelArgs dict (config.json) for these training args."""
    cfg = dict(OFFICIAL_TOKENIZER_MODEL_ARGS)
    cfg.update(
        image_size=args.image_size, max_image_size=args.max_image_size, codebook_size=args.codebook_size,
        codebook_embed_dim=args.codebook_embed_dim, codebook_l2_norm=args.codebook_l2_norm,
        commit_loss_beta=args.commit_loss_beta, entropy_loss_ratio=args.entropy_loss_ratio,
        vq_loss_ratio=args.vq_loss_ratio, tau=0.07, enc_type="siglip2", dec_type="siglip2",
        encoder_model=args.encoder_model, decoder_model=args.decoder_model,
        num_latent_tokens=args.num_latent_tokens, enc_pretrained=False, dec_pretrained=False,
        enc_patch_size=args.encoder_patch_size, dec_patch_size=args.decoder_patch_size,
        repa_model="siglip2", repa_proj_dim=1024, repa_loss_weight=0.5,
        causal_encoder=args.causal_encoder, causal_decoder=args.causal_decoder, group_size=args.group_size,
        causal_num=args.causal_num, correction_training=args.correction_training,
    )
    return cfg


def tokenizer_train_yaml(args: argparse.Namespace) -> dict:
    """config.yaml: our arguments plus the official training keys its loaders read."""
    official = {
        "vq_model": "VQ-16", "enc_type": "siglip2", "dec_type": "siglip2", "content_degradation": "resolution_power",
        "encoder_pretrained": False, "decoder_pretrained": False, "encoder_tuning_method": "full",
        "decoder_tuning_method": "full", "min_image_size": args.image_size, "dynamic_max_image_size": None,
        "dynamic_resolution_prob": 0, "max_resolution_prob": 0, "adjust_bs_by_resolution": False,
        "repa": False, "repa_model": "siglip2", "global_token_loss_weight": 0.0, "dataset": args.data,
        "data_path": args.data, "epochs": None, "codebook_weight": 1.0, "num_codebooks": 1, "tau": 0.07,
    }
    out = dict(official)
    out.update({k: v for k, v in vars(args).items()})
    return out


def build_parser() -> argparse.ArgumentParser:
    p, g = tc.trainer_parser("train_tokenizer", __doc__, global_batch_size=128, vis_every=1000,
                             vis_what="reconstruction grid")
    B = argparse.BooleanOptionalAction
    g.add_argument("--init-from", default=None,
                   help="start from the weights of this training checkpoint (.pt) or run folder (its newest "
                        "checkpoint), with a fresh optimizer and step 0; the model flags must match it. "
                        "Its discriminator, if any, is kept when this run has one")
    g.add_argument("--grow-latent-tokens", action="store_true",
                   help="with --init-from a run with fewer latent tokens: its tokens keep their positions and "
                        "the new ones start as noisy copies of its second half (more capacity without "
                        "training from scratch; every code changes, so extract codes and train the prior again)")
    g.add_argument("--train-decoder-only", action="store_true",
                   help="freeze the encoder, codebook and self-correction path: only the decoder and "
                        "post_quant_conv learn, so the codes (and a prior trained on them) stay valid")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="fashion-mnist",
                   help="'fashion-mnist', 'synthetic[:N]' (random images) or an image folder (root/<class>/<img>)")
    g.add_argument("--data-root", default=None, help="Fashion-MNIST folder (default $DETAILFLOW_FASHION_MNIST or the system copy)")
    g.add_argument("--data-loader", default="preload", choices=["preload", "workers"],
                   help="preload: whole dataset as one tensor on the device; workers: DataLoader over an image folder")
    g.add_argument("--num-workers", type=int, default=4)
    g.add_argument("--random-flip", action=B, default=True)
    g = p.add_argument_group("model (config.json)")
    g.add_argument("--image-size", type=int, default=32)
    g.add_argument("--max-image-size", type=int, default=None, help="schedule's max size (default: --image-size)")
    g.add_argument("--codebook-size", type=int, default=1024)
    g.add_argument("--codebook-embed-dim", type=int, default=8)
    g.add_argument("--codebook-l2-norm", action=B, default=True)
    g.add_argument("--num-latent-tokens", type=int, default=32)
    g.add_argument("--encoder-model", default="siglip2_custom_L4_D128_H4")
    g.add_argument("--decoder-model", default="siglip2_custom_L4_D128_H4")
    g.add_argument("--encoder-patch-size", type=int, default=4)
    g.add_argument("--decoder-patch-size", type=int, default=4)
    g.add_argument("--group-size", type=int, default=4)
    g.add_argument("--causal-num", type=int, default=None, help="default: group size")
    g.add_argument("--causal-encoder", action=B, default=True)
    g.add_argument("--causal-decoder", action=B, default=False)
    g.add_argument("--correction-training", action=B, default=True)
    g = p.add_argument_group("degradation and self-correction")
    g.add_argument("--degradation-prob", type=float, default=0.2)
    g.add_argument("--degradation-power", type=float, default=1.5)
    g.add_argument("--correction-top-k", type=int, default=50, help="noise code drawn among the k nearest")
    g = p.add_argument_group("losses")
    g.add_argument("--reconstruction-loss", default="l2", choices=["l1", "l2"])
    g.add_argument("--reconstruction-weight", type=float, default=1.0)
    g.add_argument("--commit-loss-beta", type=float, default=0.25)
    g.add_argument("--vq-loss-ratio", type=float, default=1.0)
    g.add_argument("--entropy-loss-ratio", type=float, default=0.0)
    g.add_argument("--perceptual-net", default=None,
                   help="'module:factory' returning a feature network (images in [-1,1] -> tensor(s)); off by default")
    g.add_argument("--perceptual-weight", type=float, default=1.0)
    g.add_argument("--perceptual-warmup", type=int, default=None, help="ramp the perceptual weight over N steps")
    g.add_argument("--disc-weight", type=float, default=0.0, help="PatchGAN hinge loss weight (0: no discriminator)")
    g.add_argument("--disc-start", type=int, default=0, help="step at which the GAN losses start")
    g.add_argument("--disc-dim", type=int, default=64)
    g.add_argument("--disc-layers", type=int, default=2)
    g = p.add_argument_group("optimization")
    g.add_argument("--optimizer", default="adam", choices=["adam", "adamw"])
    g.add_argument("--lr", type=float, default=1e-4, help="base LR per 256 images (see --scale-lr)")
    g.add_argument("--scale-lr", action=B, default=True, help="LR = lr * global_batch_size / 256 (official)")
    g.add_argument("--lr-scheduler", default="cosine", choices=["cosine", "constant"])
    g.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of --max-steps")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine end, as a fraction of LR (official 0.1)")
    g.add_argument("--weight-decay", type=float, default=1e-4)
    tc.add_adam_ema_arguments(g, ema=False)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.max_image_size is None:
        args.max_image_size = args.image_size
    if args.warmup_steps is None:
        args.warmup_steps = int(0.05 * args.max_steps)
    return args


# --------------------------------------------------------------------------- step plan


@dataclass
class StepPlan:
    """What one training step does: encode ``num_tokens``, decode ``t`` at ``dec_res``."""

    num_tokens: int
    t: int
    dec_res: int
    tgt_res: int
    degraded: bool
    noise_idx: Optional[int]


def sample_plan(schedule, image_size: int, degradation_prob: float, correction_training: bool) -> StepPlan:
    """Official ResolutionDegradation.get_input_output_img + get_noise_token_idx."""
    g, c = schedule.group_size, schedule.causal_num
    T = schedule.best_tokens(image_size)
    t, tgt_res, dec_res, degraded = T, image_size, image_size, False
    if degradation_prob > 0 and torch.rand(1).item() < degradation_prob:
        if T < g + c:
            raise ValueError(f"degradation needs at least group_size + causal_num = {g + c} tokens, have {T}")
        t = int(torch.randint(1, T - g + 1, (1,)).item())
        if t > c:
            t = math.ceil(t / g) * g
        tgt_res, dec_res, degraded = schedule.res(t), schedule.decode_size(t), True
    noise_idx = noise_token_index(t, g, c) if correction_training else None
    return StepPlan(T, t, dec_res, tgt_res, degraded, noise_idx)


def degrade_target(images: torch.Tensor, plan: StepPlan) -> torch.Tensor:
    """The supervision image: down to res(t) and back up to the decode size (degraded steps only)."""
    if not plan.degraded:
        return images
    return resize_images(resize_images(images, plan.tgt_res), plan.dec_res)


def _track_usage(vq: VQModel, codes: torch.Tensor) -> None:
    buf = vq.quantize.codebook_used
    if buf is None:
        return
    flat = codes.reshape(-1)[-buf.numel():].to(buf.dtype)
    n = flat.numel()
    with torch.no_grad():
        if n < buf.numel():
            buf[:-n].copy_(buf[n:].clone())
        buf[-n:].copy_(flat)


# --------------------------------------------------------------------------- training module


DECODER_SIDE = ("decoder.", "post_quant_conv.")


def freeze_all_but_decoder(vq: VQModel) -> None:
    """Decoder fine-tuning: only the decoder and post_quant_conv keep requires_grad.

    The encoder, quant_conv, codebook, refine_conv and refined_tokens are frozen, so every code the
    tokenizer gives (clean, self-correction input and target) is unchanged by training.
    """
    for name, p in vq.named_parameters():
        p.requires_grad_(name.startswith(DECODER_SIDE))
    if not any(p.requires_grad for p in vq.parameters()):
        raise ValueError("--train-decoder-only: the model has no decoder parameters")


class TokenizerTrainModule(nn.Module):
    """The generator side of a step, as one forward (so DDP sees every parameter use)."""

    def __init__(self, vq: VQModel, args: argparse.Namespace, perceptual: Optional[PerceptualLoss] = None):
        super().__init__()
        self.vq = vq
        self.args = args
        self.rec_loss = reconstruction_loss(args.reconstruction_loss)
        self.perceptual = perceptual

    def correction_parameters(self) -> list:
        params = [self.vq.encoder.refined_tokens] if self.vq.encoder.refined_tokens is not None else []
        if hasattr(self.vq, "refine_conv"):
            params += list(self.vq.refine_conv.parameters())
        return params

    def forward(self, images: torch.Tensor, target: torch.Tensor, plan: StepPlan,
                perceptual_weight: float = 0.0, disc: Optional[nn.Module] = None, disc_weight: float = 0.0):
        a, vq = self.args, self.vq
        enc = self_correction_encode(vq, images, plan.num_tokens, plan.noise_idx, a.correction_top_k)
        T = plan.num_tokens
        vq_l, commit_l = vq_losses(enc.zn, enc.zq, a.commit_loss_beta, a.vq_loss_ratio)
        ent_l = a.entropy_loss_ratio * entropy_loss(enc.distances) if a.entropy_loss_ratio else None
        if self.training:
            _track_usage(vq, enc.codes)
        quant = enc.quant
        if plan.noise_idx is not None:
            i = plan.noise_idx
            e = i + noise_span(i, vq.config.group_size, vq.config.causal_num)
            total = 2 * T - e
            w_clean, w_noise = T / total, (T - e) / total
            vq_n, commit_n = vq_losses(enc.zn2, enc.zq2, a.commit_loss_beta, a.vq_loss_ratio, noise_end=e)
            vq_l, commit_l = vq_l * w_clean + vq_n * w_noise, commit_l * w_clean + commit_n * w_noise
            if ent_l is not None:
                ent_l = ent_l * w_clean + a.entropy_loss_ratio * entropy_loss(enc.distances2) * w_noise
            if self.training:
                _track_usage(vq, enc.codes_new)
            quant = torch.cat((enc.quant, enc.quant_noisy), dim=0)
            target = torch.cat((target, target), dim=0)
        elif self.training:
            # Keep the self-correction parameters in the graph (zero gradient) so DDP needs no
            # find_unused_parameters when a rank draws no perturbation (t == 1).
            dummy = [p.sum() for p in self.correction_parameters()]
            if dummy:
                vq_l = vq_l + 0.0 * sum(dummy)
        recon = vq.decode(quant, plan.t, plan.dec_res).float()
        rec_l = self.rec_loss(target, recon)
        loss = a.reconstruction_weight * rec_l + vq_l + commit_l
        stats = {"rec_loss": rec_l.detach(), "vq_loss": vq_l.detach(), "commit_loss": commit_l.detach()}
        if ent_l is not None:
            loss = loss + ent_l
            stats["entropy_loss"] = ent_l.detach()
        if self.perceptual is not None and perceptual_weight > 0:
            p_l = self.perceptual(target, recon)
            loss = loss + perceptual_weight * p_l
            stats["perceptual_loss"] = p_l.detach()
        if disc is not None and disc_weight > 0:
            g_l = hinge_g_loss(disc(disc_input(recon, a.image_size)))
            loss = loss + disc_weight * g_l
            stats["gen_adv_loss"] = g_l.detach()
        stats["loss"] = loss.detach()
        return loss, recon, target, stats


def disc_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """Degraded (small) decodes are upsampled to the training size before the discriminator."""
    if images.shape[-1] == size:
        return images
    return F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------- data


def to_float_images(u8: torch.Tensor, flip: bool) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float in [-1, 1], each image flipped horizontally with probability 1/2."""
    x = u8.float() / 127.5 - 1.0
    if flip:
        m = torch.rand(x.shape[0], device=x.device) < 0.5
        x = torch.where(m[:, None, None, None], x.flip(-1), x)
    return x


def image_batches(args, info: tc.DistInfo, local_batch: int, start_step: int):
    """Endless iterator of float image batches on the device."""
    if args.data_loader == "preload" or args.data.startswith("synthetic") or args.data == "fashion-mnist":
        imgs, _ = load_dataset_tensors(args.data, args.image_size, args.data_root)
        imgs = imgs.to(info.device)
        batches = tc.TensorBatches((imgs,), local_batch, info, args.global_seed)
        for (u8,) in batches.batches(start_step):
            yield to_float_images(u8, args.random_flip)
    else:
        from torch.utils.data import DataLoader
        from torch.utils.data.distributed import DistributedSampler

        from .datasets import ImageFolderDataset

        ds = ImageFolderDataset(args.data, args.image_size, random_flip=args.random_flip)
        sampler = DistributedSampler(ds, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                     seed=args.global_seed, drop_last=True)
        loader = DataLoader(ds, batch_size=local_batch, sampler=sampler, num_workers=args.num_workers,
                            pin_memory=info.device.type == "cuda", drop_last=True)
        epoch = start_step // max(len(loader), 1)
        while True:
            sampler.set_epoch(epoch)
            for x, _ in loader:
                yield x.to(info.device, non_blocking=True)
            epoch += 1


# --------------------------------------------------------------------------- trainer


# Parameters with one row per latent token, (1, T, width).
LATENT_TOKEN_KEYS = ("encoder.latent_pos_embed", "encoder.latent_tokens", "encoder.refined_tokens",
                     "decoder.latent_pos_embed")


@torch.no_grad()
def grow_latent_tokens(state: dict, num_tokens: int, where: str, seed: int = 0) -> dict:
    """A tokenizer state with T latent tokens grown to ``num_tokens``: positions 0..T-1 keep theirs, and
    new position T+j starts as a copy of source token T//2 + j*(T - T//2)//(num_tokens - T) (the late,
    fine-detail half, each used equally often) plus N(0, (0.1 std)^2) noise that breaks the symmetry."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(state)
    for key in LATENT_TOKEN_KEYS:
        if key not in state:
            continue
        v = state[key]
        old = v.shape[1]
        if old > num_tokens:
            raise ValueError(f"{where}: {key} has {old} latent tokens, more than this run's {num_tokens}")
        if old == num_tokens:
            continue
        src = [old // 2 + j * (old - old // 2) // (num_tokens - old) for j in range(num_tokens - old)]
        new = v[:, src]
        new = new + 0.1 * new.std() * torch.randn(new.shape, generator=gen)
        out[key] = torch.cat([v, new.to(v.dtype)], dim=1)
    return out


class TokenizerTrainer(tc.CheckpointedRun):
    """Holds the model, optimizer(s) and state of one tokenizer training run.

    ``perceptual_net``: a feature network (nn.Module or callable) for the perceptual loss,
    overriding ``--perceptual-net``.
    """

    def __init__(self, args: argparse.Namespace, perceptual_net=None, info: Optional[tc.DistInfo] = None):
        self.init_run(args, info)
        self.model_args = tokenizer_model_args(args)
        self.train_yaml = tokenizer_train_yaml(args)
        self.config = TokenizerConfig.from_dicts(self.model_args, self.train_yaml, where=str(self.folder))
        torch.manual_seed(args.global_seed)  # same initial weights (and EMA) on every rank
        self.vq = VQModel(self.config, training_modules=True).to(self.device)
        self.schedule = self.vq.schedule
        if args.image_size not in self.schedule.best_resolutions:
            raise ValueError(f"--image-size {args.image_size} is not a decode size of the schedule "
                             f"{self.schedule.best_resolutions}")
        self.ema = None
        if args.ema:
            self.ema = copy.deepcopy(self.vq).eval()
            tc.requires_grad(self.ema, False)
        tc.seed_everything(args.global_seed * self.info.world_size + self.info.rank)  # per-rank from here
        if perceptual_net is None and args.perceptual_net:
            perceptual_net = build_perceptual_net(args.perceptual_net)
        self.perceptual = PerceptualLoss(perceptual_net).to(self.device) if perceptual_net is not None else None
        self.lr = args.lr * (args.global_batch_size / 256 if args.scale_lr else 1.0)
        betas = (args.beta1, args.beta2)
        fused = {"fused": True} if self.device.type == "cuda" else {}
        if args.train_decoder_only:
            freeze_all_but_decoder(self.vq)
        self.trainable = [p for p in self.vq.parameters() if p.requires_grad]  # optimizer and clipping
        if args.optimizer == "adam":
            self.optimizer = torch.optim.Adam(self.trainable, lr=self.lr, betas=betas, **fused)
        else:
            self.optimizer = torch.optim.AdamW(tc.weight_decay_groups(self.vq, args.weight_decay), lr=self.lr,
                                               betas=betas, **fused)
        self.disc = self.optimizer_disc = None
        if args.disc_weight > 0:
            self.disc = PatchDiscriminator(3, args.disc_dim, args.disc_layers).to(self.device)
            self.optimizer_disc = torch.optim.Adam(self.disc.parameters(), lr=self.lr, betas=betas)
        self.steps = 0
        self.module = TokenizerTrainModule(self.vq, args, self.perceptual)
        self.ddp_module = tc.wrap_ddp(self.module, self.info)
        self.ddp_disc = tc.wrap_ddp(self.disc, self.info) if self.disc is not None else None
        self.logger = tc.JsonlLogger(self.folder, enabled=self.info.is_main)

    # -- state

    @property
    def trained_module(self) -> nn.Module:
        return self.vq

    def load_init_weights(self, path: Path) -> None:
        """--init-from: model weights (and EMA, from the same weights) of another run; step 0."""
        ckpt_path, ckpt = tc.load_init_checkpoint(path)
        state = ckpt["model"]
        if self.args.grow_latent_tokens:
            state = grow_latent_tokens(state, self.vq.config.num_latent_tokens, f"--init-from {ckpt_path}")
        tc.load_init_weights(self.vq, state, ckpt_path)
        if self.ema is not None:
            self.ema.load_state_dict(state, strict=True)
        # A GAN run warm-started from a GAN run keeps the trained discriminator and its Adam
        # state: a fresh one judges poorly for hundreds of steps, and meanwhile the L2 and
        # perceptual terms pull the decoder back towards blur.
        self.load_extra_state(ckpt, f"--init-from {ckpt_path}")

    def load_extra_state(self, ckpt: dict, where: str) -> None:
        """The discriminator and its optimizer from a training checkpoint, when both sides have one."""
        if self.disc is None or "discriminator" not in ckpt:
            return
        try:
            self.disc.load_state_dict(ckpt["discriminator"], strict=True)
        except RuntimeError as exc:
            raise ValueError(f"{where}: its discriminator does not match --disc-dim / --disc-layers of this run: "
                             f"{exc}") from None
        self.optimizer_disc.load_state_dict(ckpt["optimizer_disc"])

    def extra_state(self) -> dict:
        if self.disc is None:
            return {}
        return {"discriminator": self.disc.state_dict(), "optimizer_disc": self.optimizer_disc.state_dict()}

    # -- steps

    def plan(self) -> StepPlan:
        a = self.args
        return sample_plan(self.schedule, a.image_size, a.degradation_prob, a.correction_training)

    def perceptual_weight(self, step: int) -> float:
        a = self.args
        if self.perceptual is None:
            return 0.0
        if a.perceptual_warmup:
            return min(1.0, step / a.perceptual_warmup) * a.perceptual_weight
        return a.perceptual_weight

    def gan_active(self, step: int) -> bool:
        return self.disc is not None and step >= self.args.disc_start

    def losses(self, images: torch.Tensor, plan: StepPlan, step: Optional[int] = None):
        """Generator loss of a batch under a given plan (no optimizer step)."""
        step = self.steps if step is None else step
        target = degrade_target(images, plan)
        disc = None
        if self.gan_active(step):
            disc = self.disc
        with tc.autocast(self.device, self.args.mixed_precision, self.args.cpu_bf16):
            return self.ddp_module(images, target, plan, self.perceptual_weight(step + 1), disc,
                                   self.args.disc_weight if disc is not None else 0.0)

    def set_lr(self, step: int) -> float:
        a = self.args
        f = tc.lr_factor(step, a.max_steps, a.warmup_steps, a.lr_scheduler, end=a.min_lr_ratio)
        lr = self.lr * f
        for opt in (self.optimizer, self.optimizer_disc):
            if opt is not None:
                for group in opt.param_groups:
                    group["lr"] = lr
        return lr

    def train_step(self, images: torch.Tensor, plan: Optional[StepPlan] = None) -> dict:
        a = self.args
        plan = plan or self.plan()
        lr = self.set_lr(self.steps)
        self.module.train()
        gan = self.gan_active(self.steps)
        if gan:
            tc.requires_grad(self.disc, False)  # the generator loss must not train the discriminator
        self.optimizer.zero_grad(set_to_none=True)
        loss, recon, target, stats = self.losses(images, plan)
        loss.backward()
        if a.max_grad_norm:
            stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.trainable, a.max_grad_norm).detach()
        self.optimizer.step()
        if self.ema is not None:
            tc.update_ema(self.ema, self.vq, a.ema_decay)
        if gan:
            tc.requires_grad(self.disc, True)
            self.optimizer_disc.zero_grad(set_to_none=True)
            with tc.autocast(self.device, a.mixed_precision, a.cpu_bf16):
                real = self.ddp_disc(disc_input(target.detach(), a.image_size))
                fake = self.ddp_disc(disc_input(recon.detach(), a.image_size))
                d_loss = a.disc_weight * hinge_d_loss(real.float(), fake.float())
            d_loss.backward()
            if a.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.disc.parameters(), a.max_grad_norm)
            self.optimizer_disc.step()
            stats["disc_loss"] = d_loss.detach()
        self.steps += 1
        # 0-d tensors, not floats: converting here would wait for the GPU every step
        out = dict(stats)
        out.update(lr=lr, t=plan.t, noise_idx=-1 if plan.noise_idx is None else plan.noise_idx)
        return out

    def codebook_usage(self) -> float:
        buf = self.vq.quantize.codebook_used
        return float(len(torch.unique(buf)) / self.config.codebook_size) if buf is not None else float("nan")

    @torch.no_grad()
    def save_samples(self, images: torch.Tensor, tag: str) -> Optional[Path]:
        """Originals, then reconstructions from several token prefixes (each at its decode size)."""
        if not self.info.is_main:
            return None
        model = self.ema if self.ema is not None else self.vq
        was_training = model.training
        model.eval()
        T = self.schedule.best_tokens(self.args.image_size)
        sched = [t for t in self.schedule.scheduled_tokens if t <= T]
        picks = sorted({sched[round(k * (len(sched) - 1) / 5)] for k in range(6)})
        with tc.autocast(self.device, self.args.mixed_precision, self.args.cpu_bf16):
            codes, quant = model.encode(images, T)
            rows = [images] + [model.decode(quant, t).float().clamp(-1, 1) for t in picks]
        model.train(was_training)
        return tc.save_image_grid(rows, self.folder / "samples" / f"recon_{tag}.png", size=self.args.image_size)

    def fit(self) -> "TokenizerTrainer":
        a = self.args
        self.prepare_folder()
        batches = image_batches(a, self.info, self.local_batch, self.steps)
        vis_batch = None
        bar = tc.progress(a.max_steps, self.steps, a.progress and self.info.is_main, "tokenizer")
        window = tc.StatsWindow(skip=("t", "noise_idx", "lr"))
        timer = tc.Timer()
        while self.steps < a.max_steps:
            images = next(batches)
            if vis_batch is None:
                vis_batch = images[:8].clone()
            stats = self.train_step(images)
            window.add(stats)
            bar.update(1)
            last = self.steps == a.max_steps
            if tc.due(a.log_every, self.steps, last):
                avg = window.mean(self.info)
                rec = {"step": self.steps, **avg, "lr": stats["lr"], "codebook_usage": self.codebook_usage(),
                       "elapsed_s": round(timer.elapsed(), 3)}
                self.logger.log(rec)
                bar.set_postfix(loss=f"{avg.get('loss', float('nan')):.4f}", rec=f"{avg.get('rec_loss', 0):.4f}")
            if tc.due(a.vis_every, self.steps, last):
                self.save_samples(vis_batch, f"{self.steps:07d}")
            if tc.due(a.ckpt_every, self.steps, last):
                self.save_checkpoint()
        bar.close()
        if a.write_state_hash:
            # codebook_used is a per-rank statistics buffer (as in the official): not compared
            (self.folder / f"state_hash_rank{self.info.rank}.txt").write_text(
                tc.state_dict_hash(self.vq, exclude=("quantize.codebook_used",)) + "\n")
        return self


def train(argv: Union[None, Sequence[str], argparse.Namespace] = None, perceptual_net=None) -> TokenizerTrainer:
    """Python API: parse ``argv`` (or take a Namespace), train, return the trainer (models in
    memory); the process group is left at the end (`train_common.fit_and_leave`)."""
    args = argv if isinstance(argv, argparse.Namespace) else parse_args(argv)
    return tc.fit_and_leave(TokenizerTrainer(args, perceptual_net=perceptual_net))


def main(argv: Optional[Sequence[str]] = None) -> int:
    train(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
