"""Streamed training rows: every row once per epoch, bounded memory, ranks split batches exactly."""

import pytest
import torch

import featcircuit.training as T
from featcircuit import UserError
from featcircuit.activations import harvest
from featcircuit.replacement import Replacement
from featcircuit.shards import CacheRows, MemoryRows, RowStream


class _IndexRows:
    """A synthetic source whose row r holds the value r: batches say which rows they took."""

    def __init__(self, sizes):
        self.shard_rows = list(sizes)
        self.sites = ["resid", "mlp"]
        self.starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.loads = []

    def load(self, i):
        self.loads.append(i)
        v = torch.arange(self.starts[i], self.starts[i] + self.shard_rows[i], dtype=torch.float32)
        return {"resid": v[:, None].repeat(1, 3), "mlp": -v[:, None]}


def _rows(stream, start, total):
    return torch.cat([b["resid"][:, 0] for b in stream.batches(start, total)]).long()


def test_each_epoch_is_a_permutation_across_windows():
    src = _IndexRows([37, 50, 13, 50, 41, 9])  # 200 rows in uneven shards
    s = RowStream(src, batch_size=20, seed=3, shuffle_rows=100)
    assert len(s.windows(0)) >= 2 and s.windows(0) != s.windows(1)
    rows = _rows(s, 0, 20)  # two epochs of 10 steps
    for e in range(2):
        assert sorted(rows[e * 200:(e + 1) * 200].tolist()) == list(range(200))
    assert not torch.equal(rows[:200], rows[200:])  # reshuffled per epoch
    # the rows travel together: both sites of a batch are the same rows
    b = next(s.batches(0, 1))
    assert torch.equal(b["mlp"][:, 0], -b["resid"][:, 0])
    # shuffled across shards: a window mixes rows of several shards in one batch
    shard_of = torch.bucketize(rows, torch.tensor(src.starts[1:]), right=True).view(-1, 20)
    assert sum(len(b.unique()) > 1 for b in shard_of) > 10


def test_memory_bounded_by_window_not_by_rows():
    sizes = [100] * 40  # 4000 rows
    src = _IndexRows(sizes)
    s = RowStream(src, batch_size=50, seed=0, shuffle_rows=300)
    n = sum(1 for _ in s.batches(0, 2 * s.steps_per_epoch))
    assert n == 160
    # one window (≤ 300 rows) + the shard being read: far below the 4000 rows streamed
    assert s.max_rows_held <= 300 + 100
    assert s.rows_held == 0


def test_resume_mid_epoch_gives_the_same_batches():
    src = _IndexRows([30] * 10)
    s = RowStream(src, batch_size=25, seed=1, shuffle_rows=70)
    full = _rows(s, 0, 24)
    assert torch.equal(_rows(s, 7, 24), full[7 * 25:])
    assert torch.equal(_rows(s, 13, 24), full[13 * 25:])  # from inside the second epoch


@pytest.mark.parametrize("cap", [70, 10_000])
def test_ranks_take_contiguous_shares_of_the_same_global_batches(cap):
    src = _IndexRows([30] * 10)
    one = [b["resid"] for b in RowStream(src, 24, 5, cap).batches(0, 20)]
    two = [list(RowStream(src, 24, 5, cap, rank=r, world=2).batches(0, 20)) for r in range(2)]
    for i, b in enumerate(one):
        torch.testing.assert_close(torch.cat([two[0][i]["resid"], two[1][i]["resid"]]), b,
                                   rtol=0, atol=0)
    with pytest.raises(UserError, match="split evenly"):
        RowStream(src, 25, 0, cap, rank=0, world=2)


def test_one_window_is_the_old_in_memory_order():
    x = torch.randn(500, 4)
    s = RowStream(MemoryRows({"resid": x, "mlp": x}), batch_size=100, seed=2, shuffle_rows=1 << 20)
    got = torch.cat([b["resid"] for b in s.batches(0, 5)])
    perm = torch.randperm(500, generator=torch.Generator().manual_seed(2 * 7919))
    torch.testing.assert_close(got, x[perm], rtol=0, atol=0)


def test_cache_rows_are_the_harvest_rows(neox, tmp_path):
    tokens = torch.randint(0, neox.cfg.d_vocab, (10, 9), generator=torch.Generator().manual_seed(0))
    hooks = {"resid": "blocks.1.hook_resid_pre", "mlp": "blocks.1.mlp.hook_post"}
    full = harvest(neox, tokens, list(hooks.values()), progress=False)
    assert harvest(neox, tokens, list(hooks.values()), cache_dir=tmp_path, chunk_size=3,
                   progress=False, load=False) is None
    src = CacheRows(tmp_path, hooks, n_rows=70)  # cut inside the last chunk, as training cuts
    assert src.shard_rows == [24, 24, 22]
    for site, h in hooks.items():
        got = torch.cat([src.load(i)[site] for i in range(3)])
        want = full[h][:, 1:].reshape(-1, full[h].shape[-1])[:70]
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(UserError, match="fewer than"):
        CacheRows(tmp_path, hooks, n_rows=81)
    with pytest.raises(UserError, match="holds no"):
        CacheRows(tmp_path, {"resid": "blocks.2.hook_resid_pre"})


def test_streamed_training_holds_a_bounded_number_of_rows(neox, tmp_path):
    """A harvest 8× the shuffle window trains, learns, and never holds more than a window."""
    data = torch.randint(0, neox.cfg.d_vocab, (100, 16), generator=torch.Generator().manual_seed(0))
    cfg = T.TrainConfig(width=2.0, k=4, tokens=1500, epochs=2, batch_size=100, warmup_steps=3,
                        dead_tokens=300, n_ctx=16, shuffle_rows=180)
    probe: list = []
    pair = T.train_pair(neox, 1, data, cfg, acts_dir=tmp_path / "acts", chunk_size=8,
                        progress=False, stream_probe=probe)
    (stream,) = probe
    shard = max(stream.src.shard_rows)
    assert stream.n == 1500 and stream.n > 4 * (cfg.shuffle_rows + shard)
    assert stream.max_rows_held <= cfg.shuffle_rows + shard
    # the streamed pair reconstructs held-out activations (it learned, from the windows)
    from featcircuit.evaluation import evaluate_pair

    ev = evaluate_pair(Replacement(neox, {1: pair}), data[:8], progress=False)
    for site in ("resid", "mlp"):
        assert ev["sites"][site]["variance_explained"] > 0.3, ev["sites"][site]


def test_streamed_run_resumes_to_the_same_pair(neox, tmp_path, monkeypatch):
    data = torch.randint(0, neox.cfg.d_vocab, (60, 16), generator=torch.Generator().manual_seed(1))
    cfg = T.TrainConfig(width=2.0, k=4, tokens=800, epochs=2, batch_size=100, warmup_steps=3,
                        ckpt_every=5, dead_tokens=300, n_ctx=16, shuffle_rows=250)
    acts = tmp_path / "acts"
    ref = T.train_pair(neox, 1, data, cfg, acts_dir=acts, chunk_size=8, progress=False)
    calls, real = {"n": 0}, T._loss

    def dying_loss(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2 * 13:  # killed in step 13 (second epoch), after the checkpoint of 10
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(T, "_loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        T.train_pair(neox, 1, None, cfg, acts_dir=acts, ckpt_dir=tmp_path, progress=False)
    monkeypatch.setattr(T, "_loss", real)
    resumed = T.train_pair(neox, 1, None, cfg, acts_dir=acts, ckpt_dir=tmp_path, progress=False)
    for site in ("resid", "mlp"):
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            torch.testing.assert_close(getattr(getattr(resumed, site), name),
                                       getattr(getattr(ref, site), name), rtol=1e-5, atol=1e-6)
