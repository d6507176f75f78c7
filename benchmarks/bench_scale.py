"""Scale: training and attribution at Pythia-70m / Pythia-160m shapes (random weights) in one run.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_scale.py            # ≲10 min on 2 cores
    .venv/bin/python benchmarks/bench_scale.py --models pythia-70m --d-sae 16384 --tokens 65536
    .venv/bin/python benchmarks/bench_scale.py --device cuda --tokens 1048576 --growth 4194304

1. builds GPT-NeoX models from the real configs (Pythia-70m: d 512, 6 layers, d_mlp 2048;
   Pythia-160m: d 768, 12 layers, d_mlp 3072; vocab 50304) with random weights, saved as
   HuggingFace folders and loaded through ``featcircuit.models.load_model`` — no download;
2. harvests the middle layer's resid and mlp for ``--tokens`` random tokens into a chunked disk
   cache and trains the pair from it with the project's trainer (streamed, ``--steps`` steps of
   ``--batch`` rows); per dictionary width: steady-state training tokens/s (median step), the
   peak memory the training call adds (RSS sampled every 5 ms, above the RSS before it; CUDA:
   ``max_memory_allocated``), and attribution tokens/s (``attribute_edges`` on ``--attr-tokens``);
3. growth with tokens: the same training streamed from harvests of ``--tokens`` and
   ``--growth`` tokens with a fixed shuffle window, so peak memory should not move;
4. the machine's fp32 matmul peak ([batch, 2048] @ [2048, 16384], best of 3) and the fraction of
   it the mlp dictionary's training step reaches at Pythia-70m's mlp width with 16k features
   (FLOPs the step performs, :func:`step_flops`: from 4,096 features the encoder's weight
   gradient comes from the picks alone, :mod:`featcircuit.sparse_encoder`).

Prints a table and writes ``docs/scale/scale-<device>.json``. Activations of random-weights
models are not a real model's: the timings are the point, not the variance explained.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch

from featcircuit.replacement import Replacement

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's featcircuit, not an installed one
SHAPES = {
    "pythia-70m": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                       intermediate_size=2048),
    "pythia-160m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072),
}


def sparse_encoder_grad(d_sae: int, device: str) -> bool:
    """Whether the trainer takes the TopK encoder's gradient from the picks (featcircuit.sparse_encoder)."""
    from featcircuit.dictionary import DictConfig, Dictionary
    from featcircuit.sparse_encoder import use_sparse_grad

    return use_sparse_grad(Dictionary(DictConfig(d_in=1, d_sae=d_sae, k=1)), device)


def step_flops(B: int, d: int, m: int, k: int, sparse: bool) -> int:
    """Matmul FLOPs a TopK step performs: encoder forward 2·B·d·m; its weight gradient 2·B·d·m
    dense, or 2·B·k·d from the picks (AuxK picks not counted: on a CPU none run while no latent is
    dead, as in these short runs; CUDA's sync-free AuxK always runs them, so there it undercounts);
    sparse decode and its gradients 6·B·k·d."""
    return 2 * B * d * m + (2 * B * k * d if sparse else 2 * B * d * m) + 6 * B * k * d


def build_model(name: str, folder: Path, device: str):
    """A random-weights GPT-NeoX with the named Pythia shape, loaded through featcircuit."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from featcircuit.models import BUILTIN_DIR, load_model

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=50304, max_position_embeddings=2048, rotary_pct=0.25,
                        use_parallel_residual=True, bos_token_id=0, eos_token_id=0, **SHAPES[name])
    GPTNeoXForCausalLM(cfg).save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):  # harvesting needs none; loading wants one
        shutil.copy(BUILTIN_DIR / f, folder / f)
    return load_model(str(folder), device=device)


class PeakRSS:
    """Peak resident memory (bytes) above the level at entry, sampled by a thread every 5 ms."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self._rss()
        self.stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.stop = True
        self.t.join()
        self.peak = max(self.peak, self._rss())
        self.added = self.peak - self.base


def timed_training(model, layer, acts, cfg, device):
    """(pair, median step seconds per site {resid, mlp}, bytes added at peak) of one streamed run."""
    import featcircuit.training as T

    stamps: list[float] = []
    real = T._loss

    def stamped(d, x, *a, **k):
        if x.is_cuda:
            torch.cuda.synchronize()  # timing only: the trainer itself never syncs here
        stamps.append(time.perf_counter())
        return real(d, x, *a, **k)

    T._loss = stamped
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    try:
        with PeakRSS() as mem:
            pair = T.train_pair(model, layer, None, cfg, acts_dir=acts, progress=False, device=device)
            if cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
    finally:
        T._loss = real
    added = torch.cuda.max_memory_allocated() - base if cuda else mem.added
    steps = [(stamps[i + 1] - stamps[i], stamps[i + 2] - stamps[i + 1])
             for i in range(2, len(stamps) - 2, 2)]  # skip the first step (warm-up)
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return pair, {"resid": med([s[0] for s in steps]), "mlp": med([s[1] for s in steps])}, added


def growth_point(model_dir: str, acts: str, layer: int, cfg: dict, device: str) -> tuple[int, float]:
    """(bytes added at peak, training tok/s) of one streamed run, in a fresh process."""
    from featcircuit.models import load_model
    from featcircuit.training import TrainConfig

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = load_model(model_dir, device=device)
    c = TrainConfig(**cfg)
    _, step, added = timed_training(model, layer, Path(acts), c, device)
    return added, c.batch_size / (step["resid"] + step["mlp"])


def matmul_peak(device: str, batch: int, d: int = 2048, m: int = 16384) -> float:
    """Best fp32 GFLOP/s of a [batch, d] @ [d, m] matmul."""
    x, w = torch.randn(batch, d, device=device), torch.randn(d, m, device=device)
    best = float("inf")
    for _ in range(4):
        if device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        x @ w
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * batch * d * m / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--d-sae", nargs="+", type=int, default=[4096, 16384, 32768])
    ap.add_argument("--tokens", type=int, default=2048, help="harvested rows per model (BOS excluded)")
    ap.add_argument("--growth", type=int, nargs="*", default=[8192],
                    help="larger harvests of the growth check, besides --tokens (none: skip)")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--attr-tokens", type=int, default=254)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="JSON path (default docs/scale/scale-<device>.json)")
    args = ap.parse_args()

    from featcircuit.activations import harvest
    from featcircuit.attribution import attribute_edges
    from featcircuit.sites import pair_sites
    from featcircuit.training import TrainConfig

    dev = args.device
    threads = torch.get_num_threads()
    name = (torch.cuda.get_device_name() if dev.startswith("cuda")
            else f"{platform.processor() or 'cpu'}, {threads} threads")
    print(f"device: {name}")
    peak = matmul_peak(dev, args.batch)
    print(f"fp32 matmul peak [{args.batch},2048]@[2048,16384]: {peak:.1f} GFLOP/s")
    rows, growth = [], []
    tmp = Path(tempfile.mkdtemp(prefix="fc-scale-"))
    try:
        for mname in args.models:
            t0 = time.time()
            model = build_model(mname, tmp / mname, dev)
            layer = model.cfg.n_layers // 2
            r, m = pair_sites(model, layer)
            n_ctx = 128
            need = max([args.tokens, *args.growth]) if mname == args.models[0] else args.tokens
            n_seq = -(-need // (n_ctx - 1))
            toks = torch.randint(1, 50304, (n_seq, n_ctx), generator=torch.Generator().manual_seed(0))
            toks[:, 0] = 0
            acts = tmp / f"{mname}-acts"
            ts = time.time()
            harvest(model, toks, [r.hook, m.hook], cache_dir=acts, chunk_size=16, load=False,
                    progress=False)
            harvest_tps = n_seq * (n_ctx - 1) / (time.time() - ts)
            print(f"\n{mname} (built in {ts - t0:.0f}s): layer {layer}, resid {r.width}, mlp {m.width}; "
                  f"harvest {harvest_tps:,.0f} tok/s")
            print(f"{'d_sae':>6} {'train tok/s':>11} {'resid tok/s':>11} {'mlp tok/s':>10} "
                  f"{'mlp GFLOP/s':>11} {'of peak':>7} {'train +MB':>9} {'attr tok/s':>10}")
            for d_sae in args.d_sae:
                steps_rows = (args.tokens // args.batch) * args.batch
                cfg = TrainConfig(width=d_sae / r.width, k=args.k, tokens=steps_rows, epochs=1,
                                  batch_size=args.batch, warmup_steps=1, n_ctx=n_ctx,
                                  shuffle_rows=max(args.batch, args.tokens // 2), ckpt_every=10**9)
                pair, step, added = timed_training(model, layer, acts, cfg, dev)
                B = args.batch
                sparse = sparse_encoder_grad(d_sae, str(dev))
                mlp_flops = step_flops(B, m.width, d_sae, args.k, sparse)
                mlp_rate = mlp_flops / step["mlp"] / 1e9
                at = torch.randint(1, 50304, (max(1, args.attr_tokens // (n_ctx - 1)), n_ctx),
                                   generator=torch.Generator().manual_seed(1))
                at[:, 0] = 0
                ta = time.time()
                attribute_edges(Replacement(model, {layer: pair}), at.to(dev), batch_size=8, progress=False)
                attr_tps = at.shape[0] * (n_ctx - 1) / (time.time() - ta)
                row = dict(model=mname, d_resid=r.width, d_mlp=m.width, d_sae=d_sae, batch=B, k=args.k,
                           train_tok_s=B / (step["resid"] + step["mlp"]), resid_tok_s=B / step["resid"],
                           mlp_tok_s=B / step["mlp"], mlp_gflop_s=mlp_rate, frac_of_peak=mlp_rate / peak,
                           sparse_encoder_grad=sparse, mlp_flops_performed=mlp_flops,
                           train_peak_added_mb=added / 2**20, attr_tok_s=attr_tps,
                           harvest_tok_s=harvest_tps)
                rows.append(row)
                print(f"{d_sae:>6} {row['train_tok_s']:>11,.0f} {row['resid_tok_s']:>11,.0f} "
                      f"{row['mlp_tok_s']:>10,.0f} {mlp_rate:>11.1f} {mlp_rate / peak:>7.0%} "
                      f"{added / 2**20:>9.0f} {attr_tps:>10,.0f}")
                del pair
            if args.growth and mname == args.models[0]:
                d_sae = args.d_sae[0]
                window = max(args.batch, args.tokens // 2)
                print(f"growth with tokens ({mname}, d_sae {d_sae}, shuffle window {window:,} rows; "
                      "each point in a fresh process):")
                ctx = multiprocessing.get_context("spawn")
                for n in (args.tokens, *args.growth):
                    cfg = TrainConfig(width=d_sae / r.width, k=args.k, tokens=(n // args.batch) * args.batch,
                                      epochs=1, batch_size=args.batch, warmup_steps=1, n_ctx=n_ctx,
                                      shuffle_rows=window, ckpt_every=10**9)
                    with ctx.Pool(1) as pool:
                        added, tps = pool.apply(growth_point, (str(tmp / mname), str(acts), layer,
                                                               asdict(cfg), dev))
                    growth.append(dict(model=mname, d_sae=d_sae, tokens=cfg.tokens, shuffle_rows=window,
                                       train_peak_added_mb=added / 2**20, train_tok_s=tps))
                    print(f"  {cfg.tokens:>9,} tokens: +{added / 2**20:,.0f} MB at peak, {tps:,.0f} tok/s")
            del model
            shutil.rmtree(tmp / mname, ignore_errors=True)
            shutil.rmtree(acts, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    aim = [r for r in rows if r["model"] == "pythia-70m" and r["d_sae"] == 16384]
    if aim:
        print(f"\nPythia-70m mlp (2048) with 16k features: {aim[0]['mlp_gflop_s']:.1f} GFLOP/s = "
              f"{aim[0]['frac_of_peak']:.0%} of the measured matmul peak ({peak:.1f} GFLOP/s)")
    kind = "cuda" if dev.startswith("cuda") else "cpu"
    out = Path(args.out or ROOT / "docs" / "scale" / f"scale-{kind}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "matmul_peak_gflop_s": peak, "args": vars(args),
                               "rows": rows, "growth": growth}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
