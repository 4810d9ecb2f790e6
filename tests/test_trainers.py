"""Reference trainers: datasets, tokenizer/prior steps, self-correction codes, checkpoints, resume, DDP.

Everything runs on CPU with tiny models and synthetic images (Fashion-MNIST only where the
loader itself is tested).
"""
from __future__ import annotations

import argparse
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from detailflow_engine.checkpoint import load_checkpoint
from detailflow_ref import load_prior_checkpoint, load_tokenizer_checkpoint
from detailflow_ref import datasets as ds
from detailflow_ref import extract_codes as ec
from detailflow_ref import train_common as tc
from detailflow_ref import train_prior as tp
from detailflow_ref import train_tokenizer as tt

REPO = Path(__file__).resolve().parents[1]

# 32x32 images, patch 8 (4x4 grid), 16 tokens, group 4 (causal_num 4), 64 codes, 1-layer towers.
TOK_TINY = ["--data", "synthetic:32", "--image-size", "32", "--encoder-patch-size", "8", "--decoder-patch-size", "8",
            "--num-latent-tokens", "16", "--group-size", "4", "--codebook-size", "64",
            "--encoder-model", "siglip2_custom_L1_D32_H2", "--decoder-model", "siglip2_custom_L1_D32_H2",
            "--device", "cpu", "--mixed-precision", "none", "--no-progress", "--vis-every", "0", "--log-every", "1",
            "--global-batch-size", "8"]
PRIOR_TINY = ["--gpt-model", "GPT-custom-L2-D64-H4", "--device", "cpu", "--mixed-precision", "none", "--no-progress",
              "--log-every", "1", "--global-batch-size", "8", "--samples-per-class", "1", "--ema-decay", "0.9"]
FAST_LR = ["--lr", "3e-3", "--lr-scheduler", "constant", "--warmup-steps", "0"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add contention on a shared 2-core box
    yield
    torch.set_num_threads(n)


def tok_args(folder, *extra) -> argparse.Namespace:
    return tt.parse_args(["--results-dir", str(folder), *TOK_TINY, *extra])


def prior_args(folder, codes, *extra) -> argparse.Namespace:
    return tp.parse_args(["--results-dir", str(folder), "--code-path", str(codes), *PRIOR_TINY, *extra])


def fixed_images(n=8) -> torch.Tensor:
    return tt.to_float_images(tt._synthetic_images(n, 32, seed=7), flip=False)


@pytest.fixture(scope="module")
def trained_tokenizer(tmp_path_factory):
    """A tokenizer folder after 2 steps (with EMA), and its in-memory trainer."""
    folder = tmp_path_factory.mktemp("tok") / "tokenizer"
    trainer = tt.train(tok_args(folder, "--max-steps", "2", "--ema", "--ema-decay", "0.5"))
    return folder, trainer


@pytest.fixture(scope="module")
def codes_file(trained_tokenizer, tmp_path_factory):
    folder, _ = trained_tokenizer
    out = tmp_path_factory.mktemp("codes") / "codes.npz"
    torch.manual_seed(0)
    assert ec.main(["--vq-path", str(folder), "--data", "synthetic:24", "--out", str(out), "--device", "cpu",
                    "--mixed-precision", "none", "--batch-size", "10", "--no-progress", "--top-k", "8"]) == 0
    return out


# --------------------------------------------------------------------------- datasets


def test_fashion_mnist_loader():
    if not ds.fashion_mnist_available():
        pytest.skip(f"Fashion-MNIST not found at {ds.fashion_mnist_root()} (set DETAILFLOW_FASHION_MNIST)")
    images, labels = ds.load_fashion_mnist("test")
    assert images.shape == (10000, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64 and set(np.unique(labels)) == set(range(10))
    assert not images[:, :2].any() and not images[:, :, -2:].any()  # 2-pixel zero padding
    assert (images[..., 0] == images[..., 2]).all()  # grey replicated
    x, y = ds.FashionMNISTDataset("test")[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() <= x.max() <= 1
    assert y == int(labels[0])


def test_fashion_mnist_missing_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        ds.load_fashion_mnist("train", root=tmp_path)


def test_image_folder_dataset(tmp_path):
    from PIL import Image

    for cls, color in (("b_cat", 200), ("a_dog", 30)):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (40, 24), (color, color, color)).save(tmp_path / cls / "x.png")
    d = ds.ImageFolderDataset(tmp_path, 16, random_flip=True)
    assert d.classes == ["a_dog", "b_cat"] and len(d) == 2
    x, y = d[0]
    assert x.shape == (3, 16, 16) and y == 0 and abs(float(x.mean()) - (30 / 127.5 - 1)) < 0.02


# --------------------------------------------------------------------------- schedule rules


def test_step_plan_and_noise_index_rules():
    args = tok_args("/nonexistent")
    from detailflow_engine.config import TokenizerConfig
    from detailflow_engine.schedule import Schedule

    sched = Schedule.from_config(TokenizerConfig.from_dicts(tt.tokenizer_model_args(args), tt.tokenizer_train_yaml(args)))
    g, c, T = 4, 4, 16
    torch.manual_seed(0)
    seen_t = set()
    for _ in range(400):
        plan = tt.sample_plan(sched, 32, 1.0, True)
        assert plan.degraded and 1 <= plan.t <= T - g and (plan.t <= c or plan.t % g == 0)
        assert plan.dec_res == sched.decode_size(plan.t) and plan.tgt_res == sched.res(plan.t)
        seen_t.add(plan.t)
        i = plan.noise_idx
        if plan.t == 1:
            assert i is None
            continue
        e = i + tt.noise_span(i, g, c)
        assert 0 <= i < plan.t and e <= plan.t and (i < c or i % g == 0)
    assert seen_t == {1, 2, 3, 4, 8, 12}
    plan = tt.sample_plan(sched, 32, 0.0, False)
    assert (plan.t, plan.dec_res, plan.degraded, plan.noise_idx) == (T, 32, False, None)
    x = fixed_images(2)
    tgt = tt.degrade_target(x, tt.StepPlan(T, 4, 8, 5, True, None))
    assert tgt.shape == (2, 3, 8, 8)


# --------------------------------------------------------------------------- optimisation steps


def test_tokenizer_steps_lower_loss(tmp_path):
    trainer = tt.TokenizerTrainer(tok_args(tmp_path, *FAST_LR, "--no-scale-lr"))
    images = fixed_images()
    sched = trainer.schedule
    plans = [tt.StepPlan(16, 16, 32, 32, False, 8),                                      # clean + corrected
             tt.StepPlan(16, 8, sched.decode_size(8), sched.res(8), True, 2)]            # degraded, causal noise

    def total_loss():
        torch.manual_seed(123)  # same near-neighbour draws each time
        with torch.no_grad():
            return sum(float(trainer.losses(images, p)[0]) for p in plans)

    before = total_loss()
    # one step already moves the self-correction modules: refined_tokens only after noise_end
    trainer.optimizer.zero_grad()
    torch.manual_seed(1)
    loss, recon, target, stats = trainer.losses(images, plans[0])
    assert recon.shape == (16, 3, 32, 32) and target.shape == (16, 3, 32, 32)  # clean + corrected
    loss.backward()
    g = trainer.vq.encoder.refined_tokens.grad[0]
    assert g[:12].abs().sum() == 0 and g[12:].abs().sum() > 0
    assert trainer.vq.refine_conv.weight.grad.abs().sum() > 0
    for k in range(6):
        trainer.train_step(images, plans[k % 2])
    after = total_loss()
    assert trainer.steps == 6
    assert after < before, (before, after)


def test_tokenizer_loss_weighting_matches_official(tmp_path):
    """VQ terms: clean over all T tokens and corrected from noise_end, weighted T : (T - e) / (2T - e)."""
    trainer = tt.TokenizerTrainer(tok_args(tmp_path))
    vq, a = trainer.vq, trainer.args
    images = fixed_images(4)
    torch.manual_seed(5)
    _, _, _, stats = trainer.losses(images, tt.StepPlan(16, 16, 32, 32, False, 4))  # noise 4..8
    torch.manual_seed(5)
    enc = tt.self_correction_encode(vq, images, 16, 4, a.correction_top_k)
    e, T = 8, 16
    vq_c = torch.mean((enc.zq - enc.zn) ** 2)
    vq_n = torch.mean((enc.zq2[:, e:] - enc.zn2[:, e:]) ** 2)
    want = (vq_c * T + vq_n * (T - e)) / (2 * T - e)
    assert torch.allclose(stats["vq_loss"], want, rtol=1e-5)
    assert torch.allclose(stats["commit_loss"], 0.25 * want, rtol=1e-5)


def test_tokenizer_perceptual_hook_and_discriminator(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())
    trainer = tt.TokenizerTrainer(tok_args(tmp_path, "--disc-weight", "0.1", "--disc-start", "0"), perceptual_net=net)
    stats = trainer.train_step(fixed_images(4), tt.StepPlan(16, 4, 8, 5, True, 1))
    assert {"perceptual_loss", "gen_adv_loss", "disc_loss"} <= set(stats)
    assert all(p.grad is None for p in net.parameters())  # frozen
    # the CLI form: module:factory
    t2 = tt.TokenizerTrainer(tok_args(tmp_path / "b", "--perceptual-net", "torch.nn:Identity"))
    assert "perceptual_loss" in t2.train_step(fixed_images(2))


def test_prior_steps_lower_loss(tmp_path, codes_file):
    trainer = tp.PriorTrainer(prior_args(tmp_path, codes_file, *FAST_LR))
    codes, labels = trainer.codes[:8], trainer.labels[:8]
    torch.manual_seed(0)
    batch = trainer.batch(codes, labels)

    def eval_loss():
        trainer.model.eval()
        with torch.no_grad():
            return float(trainer.loss(*batch))

    before = eval_loss()
    assert abs(before - math.log(trainer.config.vocab_size)) < 1e-4  # zero-initialised output layer
    for _ in range(5):
        trainer.train_step(*batch)
    after = eval_loss()
    assert after < before - 0.05, (before, after)
    # AdamW groups as official: >= 2-D tensors decay, the rest (norm weights) do not
    groups = trainer.optimizer.param_groups
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert all(p.dim() < 2 for p in groups[1]["params"]) and all(p.dim() >= 2 for p in groups[0]["params"])


def test_generate_z_input_target():
    codes = torch.stack([torch.zeros(64, 8, dtype=torch.long), torch.ones(64, 8, dtype=torch.long),
                         torch.full((64, 8), 2)], dim=-1)
    torch.manual_seed(0)
    z_in, z_tgt = tp.generate_z_input_target(codes, 4, 0.5)
    assert z_in.shape == (64, 4) and z_tgt.shape == (64, 8)
    noisy = z_in[:, 0] == 1
    assert 10 < int(noisy.sum()) < 54
    assert (z_tgt[noisy] == 2).all() and (z_tgt[~noisy] == 0).all() and (z_in[~noisy] == 0).all()
    z_in, z_tgt = tp.generate_z_input_target(codes[..., :1], 4, 1.0)
    assert (z_in == 0).all() and z_tgt.shape == (64, 8)


def test_lr_schedule_and_ema():
    f = [tc.lr_factor(s, 100, 10, "cosine") for s in range(101)]
    assert f[0] == 0.005 and abs(f[10] - 1) < 1e-12 and abs(f[100] - 0.01) < 1e-12
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert tc.lr_factor(50, 100, 10, "constant") == 1.0
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    want = 0.9 * a.weight.detach() + 0.1 * b.weight.detach()
    tc.update_ema(a, b, 0.9)
    assert torch.allclose(a.weight, want)


# --------------------------------------------------------------------------- self-correction codes


def test_extracted_codes_follow_official_relation(codes_file):
    data = ec.load_codes(codes_file)
    codes, noise = data["codes"], data["noise_idx"]
    assert codes.shape == (24, 2, 16, 3) and data["labels"].shape == (24,)
    assert data["config"]["ar_token_num"] == 16 and data["meta"]["correction"]
    g = c = 4
    for n in range(codes.shape[0]):
        i = int(noise[n])
        assert 0 <= i < 16 - g and (i < c or i % g == 0)
        e = i + (1 if i < c else g)
        for a in range(2):
            clean, inp, tgt = codes[n, a, :, 0], codes[n, a, :, 1], codes[n, a, :, 2]
            assert (inp[:i] == clean[:i]).all() and (tgt[:e] == clean[:e]).all() and (inp[e:] == tgt[e:]).all()
    perturbed = [codes[n, a, noise[n], 1] != codes[n, a, noise[n], 0] for n in range(24) for a in range(2)]
    assert sum(perturbed) > 24  # top-8 draws mostly pick another code


def test_reencode_matches_official_noise_token_path(trained_tokenizer):
    """Our per-image re-encode equals the official encoder(x, T, noise_token=refine_conv(prefix))."""
    _, trainer = trained_tokenizer
    vq = trainer.vq.eval()
    images = fixed_images(3)
    torch.manual_seed(3)
    with torch.no_grad():
        enc = tt.self_correction_encode(vq, images, 16, torch.tensor([8, 2, -1]), top_k=8)
        for row, (i, e) in enumerate([(8, 12), (2, 3)]):
            prefix = vq.lookup(enc.input_codes[row:row + 1, :e])          # clean[:i] + perturbed[i:e]
            lat = vq.encoder(images[row:row + 1], 16, noise_token=vq.refine_conv(prefix))[1]
            codes, _ = vq.quantize(vq.quant_conv(lat))
            assert torch.equal(codes[0, e:], enc.target_codes[row, e:])
            assert torch.equal(enc.input_codes[row, :i], enc.codes[row, :i])
        assert torch.equal(enc.input_codes[2], enc.codes[2]) and torch.equal(enc.target_codes[2], enc.codes[2])
        assert torch.equal(enc.codes, vq.encode(images, 16)[0])
    vq.train()


# --------------------------------------------------------------------------- checkpoints, resume


def test_tokenizer_checkpoint_loads_identically(trained_tokenizer):
    folder, trainer = trained_tokenizer
    ckpt_path = folder / "checkpoints" / "0000002.pt"
    raw = tc.load_training_checkpoint(ckpt_path)
    assert {"model", "optimizer", "steps", "args", "ema"} <= set(raw) and raw["steps"] == 2
    assert isinstance(raw["args"], argparse.Namespace)
    assert "refine_conv.weight" in raw["model"] and "encoder.refined_tokens" in raw["model"]
    loaded = load_checkpoint(folder, "tokenizer")
    assert loaded.weights_path == ckpt_path and loaded.which == "model"
    model = load_tokenizer_checkpoint(folder)
    ref = trainer.vq.eval()
    images = fixed_images(4)
    with torch.no_grad():
        c1, q1 = model.encode(images)
        c2, q2 = ref.encode(images)
        assert torch.equal(c1, c2)
        for t in (1, 4, 8, 16):
            assert torch.equal(model.decode(q1, t), ref.decode(q2, t))
    ema = load_checkpoint(ckpt_path, "tokenizer", ema=True).state_dict
    assert all(torch.equal(v, trainer.ema.state_dict()[k]) for k, v in ema.items())
    trainer.vq.train()
    # the official config layout: every ModelArgs field, and the yaml keys the official loader reads
    import json

    import yaml

    cfg = json.loads((folder / "config.json").read_text())
    assert list(cfg) == list(tt.OFFICIAL_TOKENIZER_MODEL_ARGS)
    ycfg = yaml.safe_load((folder / "config.yaml").read_text())
    for key in ("vq_model", "content_degradation", "enc_type", "max_image_size", "num_latent_tokens",
                "group_size", "degradation_power", "min_image_size"):
        assert key in ycfg, key


def test_prior_checkpoint_loads_identically(tmp_path, codes_file):
    folder = tmp_path / "prior"
    trainer = tp.train(prior_args(folder, codes_file, "--max-steps", "2", *FAST_LR))
    raw = tc.load_training_checkpoint(folder / "checkpoints" / "0000002.pt")
    assert {"model", "ema", "optimizer", "scheduler", "steps", "args"} <= set(raw) and raw["steps"] == 2
    assert (folder / "samples" / "samples_0000002.png").is_file()  # decoded with the codes' tokenizer
    import json

    cfg = json.loads((folder / "config.json").read_text())
    assert list(cfg) == list(tp.OFFICIAL_PRIOR_MODEL_ARGS)
    assert (cfg["dim"], cfg["n_layer"], cfg["n_head"], cfg["block_size"], cfg["vocab_size"]) == (64, 2, 4, 16, 64)
    labels = torch.tensor([0, 3, 10])
    tokens = trainer.codes[:3, :12, 0]  # teacher-forcing length T - g
    for which, mem in (("ema", trainer.ema), ("model", trainer.model)):
        loaded = load_prior_checkpoint(folder, which=which)
        mem.eval()
        with torch.no_grad():
            assert torch.equal(loaded.forward_prefix(labels, tokens), mem.forward_prefix(labels, tokens))
    assert not torch.equal(trainer.ema.output.weight, trainer.model.output.weight)
    assert load_checkpoint(folder, "prior").which == "ema"


def test_prior_resume_continues_step_count(tmp_path, codes_file):
    folder = tmp_path / "prior"
    tp.train(prior_args(folder, codes_file, "--max-steps", "2", "--vis-every", "0"))
    with pytest.raises(FileExistsError, match="--resume"):
        tp.train(prior_args(folder, codes_file, "--max-steps", "4"))
    trainer = tp.train(prior_args(folder, codes_file, "--max-steps", "4", "--resume"))
    assert trainer.steps == 4
    assert sorted(p.name for p in (folder / "checkpoints").glob("*.pt")) == ["0000002.pt", "0000004.pt"]
    raw = tc.load_training_checkpoint(folder / "checkpoints" / "0000004.pt")
    assert raw["steps"] == 4 and raw["scheduler"]["last_epoch"] == 4
    import json

    steps = [json.loads(line)["step"] for line in (folder / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_prior_init_from_takes_weights_for_longer_codes(tmp_path, codes_file):
    """--init-from: another run's weights and EMA at step 0 with a fresh optimizer, also when the
    new codes hold more tokens (a tokenizer grown from 16 to 32 tokens); other vocabularies are refused."""
    src = tmp_path / "src"
    source = tp.train(prior_args(src, codes_file, "--max-steps", "2", "--vis-every", "0", *FAST_LR))
    longer = ec.load_codes(codes_file)
    longer["codes"] = np.concatenate([longer["codes"], longer["codes"]], axis=2)  # (n, 2, 32, 3)
    longer["config"] = dict(longer["config"], num_latent_tokens=32, ar_token_num=32)
    warm = tp.PriorTrainer(prior_args(tmp_path / "warm", codes_file, "--init-from", str(src), *FAST_LR),
                           codes=longer)
    warm.prepare_folder()
    assert warm.config.block_size == 32 and warm.steps == 0 and not warm.optimizer.state
    for mine, theirs in ((warm.model, source.model), (warm.ema, source.ema)):
        for (name, a), b in zip(mine.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b), name
    assert not torch.equal(warm.ema.output.weight, warm.model.output.weight)  # EMA taken as EMA
    torch.manual_seed(0)
    batch = warm.batch(warm.codes[:8], warm.labels[:8])
    assert math.isfinite(float(warm.train_step(*batch)["loss"]))

    other_vocab = dict(longer, config=dict(longer["config"], codebook_size=128))
    mismatched = tp.PriorTrainer(prior_args(tmp_path / "other", codes_file, "--init-from", str(src)),
                                 codes=other_vocab)
    with pytest.raises(ValueError, match="does not match the model flags"):
        mismatched.prepare_folder()
    missing = tp.PriorTrainer(prior_args(tmp_path / "none", codes_file, "--init-from", str(tmp_path / "nothing")))
    with pytest.raises(FileNotFoundError, match="no training checkpoint"):
        missing.prepare_folder()


def test_tokenizer_resume_continues_step_count(tmp_path):
    folder = tmp_path / "tok"
    tt.train(tok_args(folder, "--max-steps", "1"))
    trainer = tt.train(tok_args(folder, "--max-steps", "2", "--resume"))
    assert trainer.steps == 2
    raw = tc.load_training_checkpoint(folder / "checkpoints" / "0000002.pt")
    assert raw["steps"] == 2 and len(raw["optimizer"]["state"]) > 0


@pytest.mark.parametrize("gan", [False, True], ids=["l2", "l2+gan"])
def test_decoder_finetune_keeps_codes_and_lowers_loss(tmp_path, trained_tokenizer, gan):
    """--init-from + --train-decoder-only: step 0 from another run's weights; only the decoder side
    moves, so clean and self-correction codes are unchanged while the reconstruction loss drops
    (also with the PatchGAN on: the default model's last stages), in the weights and in their EMA."""
    src, _ = trained_tokenizer
    gan_args = ("--disc-weight", "0.05", "--disc-start", "0") if gan else ()
    trainer = tt.TokenizerTrainer(tok_args(tmp_path / "ft", *FAST_LR, "--no-scale-lr", "--init-from", str(src),
                                           "--train-decoder-only", "--max-steps", "8", "--ema",
                                           "--ema-decay", "0.9", *gan_args))
    trainer.prepare_folder()
    start = {k: v.clone() for k, v in trainer.vq.state_dict().items()}
    want = tc.load_training_checkpoint(tc.latest_checkpoint(src))["model"]
    assert all(torch.equal(start[k], want[k]) for k in want) and trainer.steps == 0
    images = fixed_images()
    plan = tt.StepPlan(16, 16, 32, 32, False, 8)

    def codes_and_loss():
        torch.manual_seed(3)
        with torch.no_grad():
            enc = tt.self_correction_encode(trainer.vq, images, 16, 8, 8)
            torch.manual_seed(4)
            return enc.codes, enc.input_codes, enc.target_codes, float(trainer.losses(images, plan)[3]["rec_loss"])

    *codes_before, loss_before = codes_and_loss()
    disc_before = [p.clone() for p in trainer.disc.parameters()] if gan else []
    for _ in range(8):
        stats = trainer.train_step(images, plan)
    assert ("gen_adv_loss" in stats and "disc_loss" in stats) == gan
    if gan:
        assert all(not torch.equal(a, b) for a, b in zip(disc_before, trainer.disc.parameters()))
    *codes_after, loss_after = codes_and_loss()
    assert loss_after < loss_before, (loss_before, loss_after)
    assert all(torch.equal(a, b) for a, b in zip(codes_before, codes_after))
    end = trainer.vq.state_dict()
    moved = {k for k in start if k != "quantize.codebook_used" and not torch.equal(start[k], end[k])}
    assert moved and all(k.startswith(tt.DECODER_SIDE) for k in moved), sorted(moved)[:5]
    ema = trainer.ema.state_dict()  # frozen weights exact in the EMA too (0.9 x + 0.1 x is not x)
    ema_moved = {k for k in start if k != "quantize.codebook_used" and not torch.equal(start[k], ema[k])}
    assert ema_moved and all(k.startswith(tt.DECODER_SIDE) for k in ema_moved), sorted(ema_moved)[:5]


def test_init_from_keeps_a_trained_discriminator(tmp_path):
    gan = ("--disc-weight", "0.05", "--disc-start", "0")
    src = tt.train(tok_args(tmp_path / "gan", "--max-steps", "2", *gan))
    want = src.disc.state_dict()
    assert len(src.optimizer_disc.state_dict()["state"]) > 0
    warm = tt.TokenizerTrainer(tok_args(tmp_path / "warm", "--init-from", str(tmp_path / "gan"), *gan))
    warm.prepare_folder()
    assert warm.steps == 0 and all(torch.equal(v, want[k]) for k, v in warm.disc.state_dict().items())
    assert len(warm.optimizer_disc.state_dict()["state"]) == len(src.optimizer_disc.state_dict()["state"])
    fresh = tt.TokenizerTrainer(tok_args(tmp_path / "plain", "--init-from", str(tmp_path / "gan")))
    fresh.prepare_folder()  # no discriminator in this run: only the model weights are taken
    assert fresh.disc is None
    other = tt.TokenizerTrainer(tok_args(tmp_path / "other", "--init-from", str(tmp_path / "gan"), *gan,
                                         "--disc-dim", "32"))
    with pytest.raises(ValueError, match="discriminator does not match"):
        other.prepare_folder()


def test_init_from_rejects_mismatched_or_missing_weights(tmp_path, trained_tokenizer):
    src, _ = trained_tokenizer
    other = tt.TokenizerTrainer(tok_args(tmp_path / "a", "--codebook-size", "32", "--init-from", str(src)))
    with pytest.raises(ValueError, match="does not match the model flags"):
        other.prepare_folder()
    missing = tt.TokenizerTrainer(tok_args(tmp_path / "b", "--init-from", str(tmp_path / "nothing")))
    with pytest.raises(FileNotFoundError, match="no training checkpoint"):
        missing.prepare_folder()


def test_init_from_grows_latent_tokens(tmp_path, trained_tokenizer):
    """--grow-latent-tokens: 16 -> 32 tokens; old rows kept, new rows noisy copies of the late half."""
    src, source = trained_tokenizer
    args = ("--num-latent-tokens", "32", "--init-from", str(src))
    plain = tt.TokenizerTrainer(tok_args(tmp_path / "plain", *args))
    with pytest.raises(ValueError, match="does not match the model flags"):
        plain.prepare_folder()
    grown = tt.TokenizerTrainer(tok_args(tmp_path / "grown", *args, "--grow-latent-tokens"))
    grown.prepare_folder()
    old, new = source.vq.state_dict(), grown.vq.state_dict()
    for key, value in new.items():
        if key not in tt.LATENT_TOKEN_KEYS:
            assert torch.equal(value, old[key]), key
            continue
        assert value.shape[1] == 32 and torch.equal(value[:, :16], old[key]), key
        copies = old[key][:, 8:16].repeat_interleave(2, dim=1)
        gap = (value[:, 16:] - copies).abs()
        assert 0 < gap.max() < 0.6 * copies.std(), key  # noise of 0.1 std: under 6 sigma
    torch.manual_seed(0)
    assert math.isfinite(float(grown.train_step(fixed_images(2))["loss"]))
    small = tt.TokenizerTrainer(tok_args(tmp_path / "small", "--num-latent-tokens", "8", "--init-from", str(src),
                                         "--grow-latent-tokens"))
    with pytest.raises(ValueError, match="more than this run's 8"):
        small.prepare_folder()


def test_fmnist_perceptual_net(tmp_path, monkeypatch):
    from detailflow_engine.classifier import DEFAULT_CLASSIFIER, FashionCNN
    from detailflow_ref import fmnist_perceptual as fp
    from safetensors.torch import save_file

    with pytest.raises(ValueError, match="evaluation classifier"):
        fp.feature_net(DEFAULT_CLASSIFIER)
    monkeypatch.delenv(fp.WEIGHTS_ENV, raising=False)
    with pytest.raises(ValueError, match=fp.WEIGHTS_ENV):
        fp.feature_net()
    torch.manual_seed(0)
    cnn = FashionCNN().eval()
    path = tmp_path / "percep.safetensors"
    save_file({k: v.contiguous() for k, v in cnn.state_dict().items()}, str(path))
    monkeypatch.setenv(fp.WEIGHTS_ENV, str(path))
    net = fp.feature_net()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    feats = net(x)
    assert [tuple(f.shape) for f in feats] == [(2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8)]
    # the last map pooled and flattened is what the classifier's fc reads
    with torch.no_grad():
        want = cnn.body(x).flatten(1)
    assert torch.allclose(torch.nn.functional.max_pool2d(feats[-1], 2).flatten(1), want)
    assert [tuple(f.shape) for f in net(x[:, :, :8, :8])] == [tuple(f.shape) for f in feats]  # low-res targets
    assert not any(p.requires_grad for p in net.parameters())


def test_cpu_bf16_autocast_trains(tmp_path):
    """--cpu-bf16: bf16 autocast and the math attention kernel on the CPU; steps still lower the loss."""
    from torch.nn.attention import SDPBackend
    cpu = torch.device("cpu")
    with tc.autocast(cpu, "none"):
        assert not torch.is_autocast_enabled("cpu")
    with tc.autocast(cpu, "none", cpu_bf16=True):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert torch._fused_sdp_choice(*(torch.randn(1, 1, 4, 8),) * 3) == SDPBackend.MATH.value
        assert (torch.randn(4, 8) @ torch.randn(8, 4)).dtype == torch.bfloat16
    trainer = tt.TokenizerTrainer(tok_args(tmp_path, *FAST_LR, "--no-scale-lr", "--cpu-bf16"))
    images = fixed_images()
    plan = tt.StepPlan(16, 16, 32, 32, False, 8)

    def loss():
        torch.manual_seed(9)
        with torch.no_grad():
            return float(trainer.losses(images, plan)[0])

    before = loss()
    for _ in range(6):
        trainer.train_step(images, plan)
    assert loss() < before
    assert all(p.dtype == torch.float32 for p in trainer.vq.parameters())  # fp32 master weights


def test_no_silent_overwrite(tmp_path):
    path = tc.save_checkpoint(tmp_path, 3, {"steps": 3})
    with pytest.raises(FileExistsError):
        tc.save_checkpoint(tmp_path, 3, {"steps": 4})
    assert tc.load_training_checkpoint(path)["steps"] == 3
    tc.write_model_configs(tmp_path, {"a": 1}, {"b": 2})
    tc.write_model_configs(tmp_path, {"a": 1}, {"b": 2})  # identical: fine
    with pytest.raises(FileExistsError):
        tc.write_model_configs(tmp_path, {"a": 2}, {"b": 2})


# --------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_agree(tmp_path, codes_file):
    """torchrun --nproc-per-node 2 (gloo): prior and tokenizer steps leave identical weights on both ranks."""
    driver = tmp_path / "driver.py"
    # One process group for both trainers: re-initialising one in the same process can hang gloo.
    driver.write_text(textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)
        from detailflow_ref import train_common, train_prior, train_tokenizer
        info = train_common.init_distributed("cpu")
        train_prior.PriorTrainer(train_prior.parse_args({[
            "--results-dir", str(tmp_path / "prior"), "--code-path", str(codes_file), *PRIOR_TINY, "--max-steps", "3",
            "--vis-every", "0", "--write-state-hash"]!r}), info=info).fit()
        train_tokenizer.TokenizerTrainer(train_tokenizer.parse_args({[
            "--results-dir", str(tmp_path / "tok"), *TOK_TINY, "--max-steps", "3", "--degradation-prob", "0.5",
            "--ema", "--write-state-hash"]!r}), info=info).fit()
        train_common.teardown_distributed(info)
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(REPO / "python"), str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(driver)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=int(os.environ.get("DF_TORCHRUN_TIMEOUT", "240")))
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ("prior", "tok"):
        hashes = [(tmp_path / name / f"state_hash_rank{r}.txt").read_text() for r in (0, 1)]
        assert hashes[0] == hashes[1], (name, hashes)
        log = (tmp_path / name / "log.jsonl").read_text().splitlines()
        assert len(log) == 3  # rank 0 only
    assert sorted(p.name for p in (tmp_path / "prior" / "checkpoints").glob("*.pt")) == ["0000003.pt"]
    model = load_prior_checkpoint(tmp_path / "prior")
    assert model.config.vocab_size == 64
