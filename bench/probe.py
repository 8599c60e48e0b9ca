"""Did self-supervised pretraining learn something? Pretrain a tiny image or speech model on the builtin set,
then train a linear probe on its frozen features (the builtin classes) and compare with the same model at
initialisation.

    python bench/probe.py vit-tiny-mae --steps 600
    python bench/probe.py conformer-tiny --steps 400 --batch 16
    python bench/probe.py swin-tiny-simmim --steps 400     # also: pretraining loss, last vs first 20 steps

Pretraining is a plain single-process loop (AdamW, linear warmup, cosine decay) over `build_media_loader`;
the engines, checkpoints and logging of `pretrain train` are not involved. Features: the mean of the encoder's
output tokens (patches without [CLS], last Swin stage, audio frames). Probe: multinomial logistic regression
on standardised features of `--probe-train` samples, accuracy on `--probe-test` samples the pretraining never
saw (builtin indices past the set). Prints one table row per model (random init, pretrained).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's data/, not bench/data.py

import models  # noqa: E402
from data import DataConfig  # noqa: E402
from data.media import builtin_audio, builtin_image  # noqa: E402
from data.media_loader import MediaOptions, build_media_loader  # noqa: E402
from data.media_objectives import center_crop, to_pixels  # noqa: E402

OBJECTIVE = {"vit_mae": "mae", "vit_simmim": "simmim", "swin": "simmim", "conformer": "bestrq"}


def options_for(model: models.LanguageModel) -> MediaOptions:
    cfg = model.config
    if cfg.family == "conformer":
        return MediaOptions(clip_seconds=1.0)
    crop = (0.2, 1.0) if cfg.family == "vit_mae" else (0.67, 1.0)
    return MediaOptions(crop_scale=crop, mask_patch_size=max(8, cfg.patch_size))


def pretrain(model: models.LanguageModel, *, steps: int, batch: int, lr: float, seed: int) -> list[float]:
    loader = build_media_loader(
        DataConfig(source="builtin", num_workers=1, prefetch_factor=4),
        objective=OBJECTIVE[model.config.family],
        model=model.config,
        options=options_for(model),
        batch_size=batch,
        rank=0,
        world_size=1,
        seed=seed,
    )
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
    warmup = max(steps // 10, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    )
    losses, it = [], iter(loader)
    model.train()
    for step in range(steps):
        loss = model(**next(it)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            print(f"  step {step:4d}  loss {loss.item():.4f}", flush=True)
    return losses


def probe_inputs(model: models.LanguageModel, indices: range) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = model.config
    if cfg.family == "conformer":
        clips = [builtin_audio(i, cfg.sample_rate) for i in indices]
        audio = np.stack([(a - a.mean()) / np.sqrt(a.var() + 1e-7) for a, _ in clips])
        return torch.from_numpy(audio), torch.tensor([label for _, label in clips])
    images = [builtin_image(i) for i in indices]
    pixels = np.stack([to_pixels(center_crop(image, cfg.image_size)) for image, _ in images])
    return torch.from_numpy(pixels), torch.tensor([label for _, label in images])


@torch.no_grad()
def features(model: models.LanguageModel, inputs: torch.Tensor, batch: int = 64) -> torch.Tensor:
    model.eval()
    out = []
    for chunk in inputs.split(batch):
        tokens = model.features(chunk)
        out.append((tokens[:, 1:] if model.config.family.startswith("vit") else tokens).mean(1))
    return torch.cat(out)


def probe_accuracy(model: models.LanguageModel, train: range, test: range, seed: int) -> float:
    (x_train, y_train), (x_test, y_test) = probe_inputs(model, train), probe_inputs(model, test)
    f_train, f_test = features(model, x_train), features(model, x_test)
    mean, std = f_train.mean(0), f_train.std(0) + 1e-6
    f_train, f_test = (f_train - mean) / std, (f_test - mean) / std
    torch.manual_seed(seed)
    classes = int(y_train.max()) + 1
    probe = torch.nn.Linear(f_train.shape[1], classes)
    opt = torch.optim.LBFGS(probe.parameters(), lr=0.5, max_iter=300, history_size=20)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = probe(f_train)
        loss = torch.nn.functional.cross_entropy(logits, y_train) + 1e-3 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (probe(f_test).argmax(1) == y_test).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "preset", choices=["vit-tiny-mae", "vit-tiny-simmim", "swin-tiny-simmim", "conformer-tiny"]
    )
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--probe-train", type=int, default=2000)
    parser.add_argument("--probe-test", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = models.build_model(args.preset)
    initial = copy.deepcopy(model)
    train, test = (
        range(args.probe_train),
        range(1_000_000, 1_000_000 + args.probe_test),
    )  # test: never pretrained on

    start = time.perf_counter()
    losses = pretrain(model, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed)
    minutes = (time.perf_counter() - start) / 60
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    random_acc = probe_accuracy(initial, train, test, args.seed)
    trained_acc = probe_accuracy(model, train, test, args.seed)
    print(
        f"\n| preset | steps x batch | minutes | loss first 20 -> last 20 (ratio) | probe acc random init | pretrained | gain |\n"
        f"|---|---|---|---|---|---|---|\n"
        f"| {args.preset} | {args.steps} x {args.batch} | {minutes:.1f} | {first:.4f} -> {last:.4f} ({last / first:.2f}) "
        f"| {random_acc:.3f} | {trained_acc:.3f} | {100 * (trained_acc - random_acc):+.1f} pts |"
    )


if __name__ == "__main__":
    main()
