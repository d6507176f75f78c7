"""The Python API with your own pieces: a model by path, a foreign dictionary, your own metric.

    .venv/bin/python examples/custom_attribution.py [--model PATH_OR_NAME] [--layer 2]

1. load any HuggingFace name or local folder (here the built-in model's folder, by path);
2. bring a dictionary that is *any* torch module with ``encode``/``decode`` — here a tiny
   ReLU autoencoder defined below, trained for a few seconds on the MLP activations;
3. attribute edges with a user metric: the log-probability of the token ``self`` after ``.``
   (higher = more "self." completions), and print what drives the top MLP features.
"""

from __future__ import annotations

import argparse

import torch

import featcircuit as fc
from featcircuit.models import BUILTIN_DIR


class MyAutoencoder(torch.nn.Module):
    """Not a featcircuit Dictionary: any encode/decode module works."""

    def __init__(self, d: int, m: int):
        super().__init__()
        self.enc = torch.nn.Linear(d, m)
        self.dec = torch.nn.Linear(m, d)

    def encode(self, x):
        return torch.relu(self.enc(x))

    def decode(self, f):
        return self.dec(f)


def fit(ae: MyAutoencoder, x: torch.Tensor, steps: int = 300, l1: float = 1e-2) -> MyAutoencoder:
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    for _ in range(steps):
        b = x[torch.randint(0, len(x), (512,))]
        f = ae.encode(b)
        loss = (ae.decode(f) - b).pow(2).sum(-1).mean() + l1 * f.abs().sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ae.requires_grad_(False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(BUILTIN_DIR), help="HF name or local folder")
    ap.add_argument("--layer", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = fc.load_model(args.model, device="cpu")
    resid, mlp = fc.pair_sites(model, args.layer)
    train = fc.load_tokens("builtin:stdlib", model, n_tokens=32768, split="train")
    acts = fc.harvest(model, train, [resid.hook, mlp.hook], progress=False)
    pair = (fit(MyAutoencoder(resid.width, 512), acts[resid.hook][:, 1:].flatten(0, 1)),
            fit(MyAutoencoder(mlp.width, 512), acts[mlp.hook][:, 1:].flatten(0, 1)))

    tok = model.tokenizer
    dot, self_ = tok.encode(".")[0], tok.encode("self")[0]

    def self_after_dot(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Σ log p(self | previous token is '.')."""
        logp = logits[:, :-1].log_softmax(-1)[..., self_]
        return (logp * (tokens[:, :-1] == dot)).sum()

    held = fc.load_tokens("builtin:stdlib", model, n_tokens=8192, split="heldout")
    rep = fc.Replacement(model, {args.layer: pair})  # the model and its dictionaries, one object
    table = fc.attribute_edges(rep, held, metric=self_after_dot, progress=False)
    eff = fc.node_effects(rep, held[:16], metric=self_after_dot)
    print(f"{len(table):,} co-active (resid, mlp) feature pairs over {table.n_tokens:,} tokens")
    top_j = eff["mlp"].abs().topk(3).indices.tolist()
    for j in top_j:
        t = table.for_target(j)
        t = t.select(t.order()[t.src[t.order()] >= 0][:3])
        print(f"mlp feature {j}: node effect {float(eff['mlp'][j]):+.3f}; drivers " +
              ", ".join(f"resid {i} (edge {w:+.2f}, behavioural {b:+.3f})"
                        for i, w, b in zip(t.src.tolist(), t.weight.tolist(), t.behav_weight.tolist())))
    print(f"error nodes: resid {eff['resid_err']:+.3f}, mlp {eff['mlp_err']:+.3f}")


if __name__ == "__main__":
    main()
