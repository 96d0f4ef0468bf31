"""A small training job on CPU whose DataLoader collates with tenso.torch.

A real Dataset (synthetic uint8 images with a label and a dict of per-sample features) feeds a small conv net for a
few steps, three times: with torch's ``default_collate``, with ``tenso.torch.collate`` and with
``tenso.torch.Collate(pool=...)``. The three runs see identical batches (checked), and the job prints the loss
and the time per step of each.

    python integrations/torch/job.py                 # 2 workers, batch 64, 20 steps per mode
    python integrations/torch/job.py --steps 5 --workers 2 --context spawn --pin-memory
"""

from __future__ import annotations

import argparse
import gc
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from tenso.torch import Collate, collate

FIELDS = 20


class ImageFeatureDataset(Dataset):
    """uint8 3x64x64 images, an int label and a dict of 20 small float32 feature arrays per sample."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n = n
        self.seed = seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        rng = np.random.default_rng(self.seed * 1_000_003 + i)
        label = int(rng.integers(10))
        image = rng.integers(0, 64, (3, 64, 64), dtype=np.uint8)
        image[label % 3] += 128  # something to learn
        feats = {f"f{k}": rng.standard_normal(16).astype(np.float32) + label for k in range(FIELDS)}
        return {"image": image, "label": label, "features": feats, "id": f"sample-{i}"}


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.feat = nn.Linear(FIELDS * 16, 16)
        self.head = nn.Linear(32, 10)

    def forward(self, image: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.conv(image), torch.relu(self.feat(feats))], dim=1))


def train(loader: DataLoader, steps: int) -> tuple[list[float], float, Any]:
    torch.manual_seed(0)
    model = SmallNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses: list[float] = []
    first = None
    t0 = time.perf_counter()
    for step, batch in enumerate(loader):
        if step == steps:
            break
        if first is None:
            first = batch
        image = batch["image"].float().div_(255)
        feats = torch.cat([batch["features"][f"f{k}"] for k in range(FIELDS)], dim=1)
        loss = nn.functional.cross_entropy(model(image, feats), batch["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, (time.perf_counter() - t0) / max(len(losses), 1), first


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--context", default="fork", choices=["fork", "spawn", "forkserver"])
    ap.add_argument("--pin-memory", action="store_true")
    ap.add_argument("--pool", default="64MB")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ds = ImageFeatureDataset(args.batch * args.steps)
    pool = Collate(pool=args.pool)
    modes: dict[str, Callable[[Any], Any]] = {"default_collate": default_collate, "collate": collate, "pool": pool}
    runs = {}
    for name, fn in modes.items():
        loader = DataLoader(
            ds, batch_size=args.batch, num_workers=args.workers, collate_fn=fn, prefetch_factor=2 if args.workers else None,
            multiprocessing_context=args.context if args.workers else None,
            pin_memory=args.pin_memory and torch.cuda.is_available(),
        )
        runs[name] = train(loader, args.steps)
        losses, per_step, _ = runs[name]
        print(f"{name:16} loss {losses[0]:.3f} -> {losses[-1]:.3f}   {per_step * 1e3:7.1f} ms/step")
    ref_losses, _, ref_first = runs["default_collate"]
    for name in ("collate", "pool"):
        losses, _, first = runs[name]
        assert same(first, ref_first), f"{name}: first batch differs from default_collate's"
        assert np.allclose(losses, ref_losses), f"{name}: training diverged from default_collate's"
    del runs, first, ref_first, loader
    gc.collect()  # the loaders' workers stop; leases of batches they had prefetched are freed with them
    print("identical batches and losses in every mode; pool after the job:", pool.pool.stats["used_bytes"], "bytes used")
    pool.close()


if __name__ == "__main__":
    main()
