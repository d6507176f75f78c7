"""Train a TopK SAE with SAELens's own trainer on saved activations (runs in this folder's .venv).

    .venv/bin/python saelens_train.py ACTS.safetensors OUT.json --d-sae 1024 --k 32 --batch 1024 --steps 128

``ACTS`` holds ``train`` [N, d] and ``heldout`` [M, d] rows (written by run.py from featcircuit's
harvest). Batches are a seeded shuffle of ``train``; SAELens's SAETrainer does everything
else (its TopK SAE, AuxK loss, Adam, activation-norm scaling folded in at the end). Reports the
median step time and the held-out fraction of variance explained computed with the SAE's own
encode/decode.
"""

import argparse
import json
import time

import torch
from sae_lens import __version__ as sae_lens_version
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer
from safetensors.torch import load_file


def batches(x: torch.Tensor, batch: int, seed: int):
    """An endless seeded shuffle of the rows, batch by batch (the harness, not the trainer)."""
    epoch = 0
    while True:
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        for i in range(len(x) // batch):
            yield x[perm[i * batch:(i + 1) * batch]]
        epoch += 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("acts")
    ap.add_argument("out")
    ap.add_argument("--d-sae", type=int, required=True)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    data = load_file(args.acts)
    x, held = data["train"], data["heldout"]
    torch.manual_seed(args.seed)
    cfg = TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=args.d_sae, k=args.k, dtype="float32",
                                device="cpu", normalize_activations="expected_average_only_in")
    sae = TopKTrainingSAE(cfg)
    tcfg = SAETrainerConfig(total_training_samples=args.steps * args.batch,
                            train_batch_size_samples=args.batch, device="cpu", lr=3e-4, lr_end=3e-4,
                            n_batches_for_norm_estimate=min(32, len(x) // args.batch))
    trainer = SAETrainer(tcfg, sae, batches(x, args.batch, args.seed))
    stamps = []
    real = trainer._train_step

    def stamped(*a, **k):
        stamps.append(time.perf_counter())
        return real(*a, **k)

    trainer._train_step = stamped
    t0 = time.perf_counter()
    sae = trainer.fit()
    wall = time.perf_counter() - t0
    stamps.append(time.perf_counter())
    steps = sorted(b - a for a, b in zip(stamps[1:-1], stamps[2:]))  # first step is warm-up
    sae.eval()
    with torch.no_grad():
        recon = sae.decode(sae.encode(held))
        fve = 1 - float((held - recon).pow(2).sum() / (held - held.mean(0)).pow(2).sum())
        l0 = float((sae.encode(held) != 0).sum(-1).float().mean())
    json.dump({"trainer": f"SAELens {sae_lens_version}", "median_step_s": steps[len(steps) // 2],
               "tok_s": args.batch / steps[len(steps) // 2], "wall_s": wall,
               "heldout_fve": fve, "heldout_l0": l0, "steps": args.steps, "batch": args.batch},
              open(args.out, "w"))


if __name__ == "__main__":
    main()
