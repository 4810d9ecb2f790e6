"""Train the DetailFlow class-conditional prior (official ``autoregressive/train/train_c2i.py`` semantics).

    python -m detailflow_ref.train_prior --results-dir out/prior --code-path out/codes.npz \\
        --gpt-model GPT-custom-L6-D256-H8 --global-batch-size 512 --max-steps 5000

Several processes: ``python -m torch.distributed.run --nproc-per-node N -m detailflow_ref.train_prior ...``.

Each step: a batch of code sequences (every image and its flip is one sample) with labels.
With probability ``--correction-prob`` per sample the input is the self-correction ``input``
sequence and the target the ``target`` sequence, else both are the clean codes (official
``generate_z_input_target``). Teacher forcing feeds input[:, :-g]; the reference
Transformer's forward builds [cls, tok[:c], specials, tok[c:]] under the group-causal mask and
position i predicts target[i]; loss = mean cross-entropy over all T positions. In train mode
the class label is replaced by the null class with probability class_dropout_prob (CFG) and
the token/residual/FFN dropouts act.

Optimizer: AdamW(betas, weight decay on >= 2-D tensors only, fused on CUDA), LambdaLR with
linear warmup from 0.005 x LR and cosine to 0.01 x LR (official) or constant, gradient
clipping, EMA (official update_ema; ``--ema-decay``, official 0.9999). Initialization as the
official GPT: Linear and Embedding weights N(0, initializer_range), output layer zero,
special-token embeddings N(0, 1) (created after the official init).

Checkpoints: ``<results-dir>/checkpoints/<steps>.pt`` = {'model', 'ema', 'optimizer',
'scheduler', 'steps', 'args'}; config.json = the official GPT ModelArgs; config.yaml holds
``gpt_model``.
"""
from __future__ import annotations

import argparse
import copy
import inspect
import re
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from detailflow_engine.config import GPT_SIZES, PriorConfig

from . import train_common as tc
from .extract_codes import load_codes
from .gpt import Transformer

# Official GPT ModelArgs (autoregressive/models/gpt.py) fields in declaration order with defaults.
OFFICIAL_PRIOR_MODEL_ARGS = {
    "dim": 4096, "n_layer": 32, "n_head": 32, "n_kv_head": None, "multiple_of": 256, "ffn_dim_multiplier": None,
    "rope_base": 10000, "norm_eps": 1e-05, "initializer_range": 0.02, "token_dropout_p": 0.1,
    "attn_dropout_p": 0.0, "resid_dropout_p": 0.1, "ffn_dropout_p": 0.1, "drop_path_rate": 0.0,
    "num_classes": 1000, "caption_dim": 2048, "class_dropout_prob": 0.1, "model_type": "c2i",
    "vocab_size": 16384, "cls_token_num": 1, "block_size": 256, "max_batch_size": 32, "max_seq_len": 2048,
    "learnable_tok_embeddings": True, "group_size": 1, "causal_num": None,
}


def gpt_sizes(name: str):
    """(n_layer, n_head, dim) of an official GPT name or GPT-custom-L<layers>-D<dim>-H<heads>."""
    if name in GPT_SIZES:
        return GPT_SIZES[name]
    m = re.match(r"^GPT-custom-L(\d+)-D(\d+)-H(\d+)$", name or "")
    return (int(m.group(1)), int(m.group(3)), int(m.group(2))) if m else None


def prior_model_args(args: argparse.Namespace, vocab_size: int, block_size: int, group_size: int,
                     causal_num: Optional[int], num_classes: int) -> dict:
    sizes = gpt_sizes(args.gpt_model)
    if sizes is None:
        raise ValueError(f"unknown --gpt-model {args.gpt_model!r}: one of {sorted(GPT_SIZES)} "
                         f"or GPT-custom-L<layers>-D<dim>-H<heads>")
    n_layer, n_head, dim = sizes
    if args.drop_path_rate:
        raise ValueError("drop_path_rate > 0 is not implemented by the reference Transformer")
    cfg = dict(OFFICIAL_PRIOR_MODEL_ARGS)
    cfg.update(dim=dim, n_layer=n_layer, n_head=n_head, token_dropout_p=args.token_dropout_p,
               resid_dropout_p=args.dropout_p, ffn_dropout_p=args.dropout_p, drop_path_rate=args.drop_path_rate,
               num_classes=num_classes, class_dropout_prob=args.class_dropout_prob, vocab_size=vocab_size,
               cls_token_num=args.cls_token_num, block_size=block_size, group_size=group_size,
               causal_num=causal_num)
    return cfg


def prior_train_yaml(args: argparse.Namespace) -> dict:
    out = {"gpt_type": "c2i", "dataset": "imagenet_code", "learnable_tok_embeddings": True}
    out.update(vars(args))
    return out


def build_parser() -> argparse.ArgumentParser:
    p, g = tc.trainer_parser("train_prior", __doc__, global_batch_size=256, vis_every=0, vis_what="sample grid")
    g.add_argument("--init-from", default=None,
                   help="start from the weights (and EMA) of this prior training checkpoint (.pt) or run folder "
                        "(its newest checkpoint), with a fresh optimizer, schedule and step 0; the model flags, "
                        "vocabulary and classes must match it, the token count may differ (new codes, e.g. of a "
                        "tokenizer with more tokens: the 2D rotary table is rebuilt for this run's block size)")
    g = p.add_argument_group("data")
    g.add_argument("--code-path", required=True, help=".npz written by detailflow_ref.extract_codes")
    g.add_argument("--num-classes", type=int, default=None, help="default: from the codes file")
    g.add_argument("--correction-prob", type=float, default=0.3)
    g = p.add_argument_group("model")
    g.add_argument("--gpt-model", default="GPT-custom-L6-D256-H8")
    g.add_argument("--cls-token-num", type=int, default=1)
    g.add_argument("--dropout-p", type=float, default=0.1, help="residual and FFN dropout")
    g.add_argument("--token-dropout-p", type=float, default=0.1)
    g.add_argument("--drop-path-rate", type=float, default=0.0)
    g.add_argument("--class-dropout-prob", type=float, default=0.1)
    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--lr-scheduler", default="cosine", choices=["cosine", "constant"])
    g.add_argument("--warmup-steps", type=int, default=None)
    g.add_argument("--warmup-ratio", type=float, default=0.05)
    g.add_argument("--weight-decay", type=float, default=5e-2)
    tc.add_adam_ema_arguments(g, ema=True)
    g = p.add_argument_group("samples")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder to decode samples (default: from the codes file)")
    g.add_argument("--cfg-scale", type=float, default=2.0)
    g.add_argument("--samples-per-class", type=int, default=4)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.warmup_steps is None:
        args.warmup_steps = int(args.warmup_ratio * args.max_steps)
    return args


def generate_z_input_target(codes: torch.Tensor, group_size: int, p: float):
    """Official generate_z_input_target: codes (B, T, K) -> (input (B, T-g), target (B, T)).

    K = 1: clean only. K = 3: per sample, with probability p, (input, target) = channels 1, 2.
    """
    if codes.shape[-1] == 1:
        return codes[:, :-group_size, 0], codes[:, :, 0]
    if codes.shape[-1] != 3:
        raise ValueError(f"codes must have 1 or 3 channels, got {codes.shape[-1]}")
    noisy = (torch.rand(codes.shape[0], device=codes.device) < p)[:, None]
    z_in = torch.where(noisy, codes[:, :-group_size, 1], codes[:, :-group_size, 0])
    z_tgt = torch.where(noisy, codes[:, :, 2], codes[:, :, 0])
    return z_in, z_tgt


@torch.no_grad()
def init_prior_weights(model: Transformer, std: float = 0.02) -> None:
    """Official GPT init: Linear/Embedding N(0, std), output zero; spe_tok_embeddings keep N(0, 1)."""
    for name, m in model.named_modules():
        if name.startswith("spe_tok_embeddings"):
            continue
        if isinstance(m, (nn.Linear, nn.Embedding)):
            m.weight.normal_(0.0, std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.zero_()
    nn.init.constant_(model.output.weight, 0)
    nn.init.normal_(model.spe_tok_embeddings.special_embeddings.weight, 0.0, 1.0)


def prior_loss(model: nn.Module, z_input: torch.Tensor, z_target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model(z_input, labels)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), z_target.reshape(-1))


class PriorTrainer(tc.CheckpointedRun):
    """Model, EMA, optimizer, scheduler and data of one prior training run."""

    def __init__(self, args: argparse.Namespace, info: Optional[tc.DistInfo] = None, codes: Optional[dict] = None):
        self.init_run(args, info)
        data = codes if codes is not None else load_codes(args.code_path)
        self.codes_meta, vq_cfg = data["meta"], data["config"]
        num_classes = args.num_classes or int(data["meta"]["num_classes"])
        codes_np, labels_np = data["codes"], data["labels"]
        n, a, T, k = codes_np.shape
        self.codes = torch.from_numpy(codes_np.astype("int64")).reshape(n * a, T, k).to(self.device)
        self.labels = torch.from_numpy(labels_np.astype("int64")).repeat_interleave(a).to(self.device)
        if int(self.labels.max()) >= num_classes:
            raise ValueError(f"labels go up to {int(self.labels.max())} but num_classes is {num_classes}")
        group = int(vq_cfg["group_size"])
        self.model_args = prior_model_args(args, int(vq_cfg["codebook_size"]), int(vq_cfg.get("ar_token_num", T)),
                                           group, vq_cfg.get("causal_num"), num_classes)
        self.train_yaml = prior_train_yaml(args)
        self.config = PriorConfig.from_dicts(self.model_args, self.train_yaml, where=str(self.folder))
        if self.config.causal_num >= self.config.block_size:
            raise ValueError(f"causal_num {self.config.causal_num} must be < block_size {self.config.block_size}")
        torch.manual_seed(args.global_seed)  # same initial weights (and EMA) on every rank
        self.model = Transformer(self.config)
        init_prior_weights(self.model, float(self.model_args["initializer_range"]))
        self.model.to(self.device)
        self._move_tables()
        self.ema = None
        if args.ema:
            self.ema = copy.deepcopy(self.model).eval()
            tc.requires_grad(self.ema, False)
        tc.seed_everything(args.global_seed * self.info.world_size + self.info.rank)  # per-rank from here
        extra = {}
        if self.device.type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters:
            extra["fused"] = True
        self.optimizer = torch.optim.AdamW(tc.weight_decay_groups(self.model, args.weight_decay), lr=args.lr,
                                           betas=(args.beta1, args.beta2), **extra)
        self.scheduler = tc.make_lr_scheduler(self.optimizer, args.max_steps, args.warmup_steps, args.lr_scheduler)
        self.steps = 0
        self.ddp_model = tc.wrap_ddp(self.model, self.info)
        self.logger = tc.JsonlLogger(self.folder, enabled=self.info.is_main)
        self._tokenizer = None

    def _move_tables(self) -> None:
        for m in (self.model, getattr(self, "ema", None)):
            if m is not None:
                m.freqs_cis = m.freqs_cis.to(self.device)
                m.group_causal_mask = m.group_causal_mask.to(self.device)

    # -- state

    @property
    def trained_module(self) -> nn.Module:
        return self.model

    def load_init_weights(self, path: Path) -> None:
        """--init-from: model and EMA weights of another run; optimizer, schedule and step start afresh."""
        ckpt_path, ckpt = tc.load_init_checkpoint(path)
        tc.load_init_weights(self.model, ckpt["model"], ckpt_path)
        if self.ema is not None:
            self.ema.load_state_dict(ckpt.get("ema", ckpt["model"]), strict=True)

    def extra_state(self) -> dict:
        return {"scheduler": self.scheduler.state_dict()}

    def load_extra_state(self, ckpt: dict, where: str) -> None:
        if "scheduler" in ckpt:
            self.scheduler.load_state_dict(ckpt["scheduler"])

    # -- steps

    def batch(self, codes: torch.Tensor, labels: torch.Tensor):
        z_in, z_tgt = generate_z_input_target(codes, self.config.group_size, self.args.correction_prob)
        return z_in, z_tgt, labels

    def loss(self, z_in, z_tgt, labels) -> torch.Tensor:
        with tc.autocast(self.device, self.args.mixed_precision, self.args.cpu_bf16):
            return prior_loss(self.ddp_model, z_in, z_tgt, labels)

    def train_step(self, z_in, z_tgt, labels) -> dict:
        a = self.args
        self.model.train()
        lr = self.optimizer.param_groups[0]["lr"]
        loss = self.loss(z_in, z_tgt, labels)
        loss.backward()
        stats = {"loss": loss.detach()}
        if a.max_grad_norm:
            stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), a.max_grad_norm).detach()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            tc.update_ema(self.ema, self.model, a.ema_decay)
        self.steps += 1
        out = dict(stats)  # 0-d tensors: no per-step wait for the GPU
        out["lr"] = lr
        return out

    def tokenizer(self):
        """The tokenizer used to decode samples (None when it cannot be found)."""
        if self._tokenizer is None:
            path = self.args.tokenizer or self.codes_meta.get("tokenizer_path")
            if not path or not Path(path).exists():
                return None
            from .tokenizer import load_tokenizer_checkpoint

            self._tokenizer = load_tokenizer_checkpoint(path).to(self.device).eval()
        return self._tokenizer

    @torch.no_grad()
    def save_samples(self, tag: str) -> Optional[Path]:
        """Generated samples (rows = classes, up to 10) decoded with the tokenizer."""
        if not self.info.is_main:
            return None
        tok = self.tokenizer()
        if tok is None:
            return None
        from .generate import generate

        model = self.ema if self.ema is not None else self.model
        was = model.training
        model.eval()
        ncls = min(self.config.num_classes, 10)
        labels = torch.arange(ncls, device=self.device).repeat_interleave(self.args.samples_per_class)
        gen = torch.Generator(device=self.device).manual_seed(self.args.global_seed)
        with tc.autocast(self.device, self.args.mixed_precision, self.args.cpu_bf16):
            tokens = generate(model, labels, cfg_scale=self.args.cfg_scale, generator=gen)
            imgs = tok.decode_code(tokens).float().clamp(-1, 1)
        model.train(was)
        rows = list(imgs.view(ncls, self.args.samples_per_class, *imgs.shape[1:]))
        return tc.save_image_grid(rows, self.folder / "samples" / f"samples_{tag}.png")

    def fit(self) -> "PriorTrainer":
        a = self.args
        self.prepare_folder()
        batches = tc.TensorBatches((self.codes, self.labels), self.local_batch, self.info, a.global_seed).batches(self.steps)
        bar = tc.progress(a.max_steps, self.steps, a.progress and self.info.is_main, "prior")
        window = tc.StatsWindow()
        timer = tc.Timer()
        while self.steps < a.max_steps:
            codes, labels = next(batches)
            stats = self.train_step(*self.batch(codes, labels))
            window.add(stats)
            bar.update(1)
            last = self.steps == a.max_steps
            if tc.due(a.log_every, self.steps, last):
                avg = window.mean(self.info)
                self.logger.log({"step": self.steps, **avg, "lr": stats["lr"], "elapsed_s": round(timer.elapsed(), 3)})
                bar.set_postfix(loss=f"{avg['loss']:.4f}")
            if tc.due(a.vis_every, self.steps, last):
                self.save_samples(f"{self.steps:07d}")
            if tc.due(a.ckpt_every, self.steps, last):
                self.save_checkpoint()
        bar.close()
        if a.write_state_hash:
            (self.folder / f"state_hash_rank{self.info.rank}.txt").write_text(
                tc.state_dict_hash(self.model) + " " + (tc.state_dict_hash(self.ema) if self.ema else "-") + "\n")
        return self


def train(argv: Union[None, Sequence[str], argparse.Namespace] = None) -> PriorTrainer:
    """Python API: parse ``argv`` (or take a Namespace), train, return the trainer (models in
    memory); the process group is left at the end (`train_common.fit_and_leave`)."""
    args = argv if isinstance(argv, argparse.Namespace) else parse_args(argv)
    return tc.fit_and_leave(PriorTrainer(args))


def main(argv: Optional[Sequence[str]] = None) -> int:
    train(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
