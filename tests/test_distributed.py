"""Data-parallel training and sharded attribution with two gloo processes equal one process."""

import json
import os
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp

import featcircuit.distributed as D
import featcircuit.sharded_edges as SE
import featcircuit.training as T
from featcircuit.attribution import attribute_edges, default_metric
from featcircuit.dictionary import load_pair
from featcircuit.replacement import Replacement

CFG = dict(width=2.0, k=4, tokens=800, epochs=2, batch_size=100, warmup_steps=3, ckpt_every=5,
           dead_tokens=300, n_ctx=16, shuffle_rows=250)
NAMES = ("W_enc", "W_dec", "b_enc", "b_dec")


def _tokens(model, n=60, ctx=16, seed=1):
    return torch.randint(0, model.cfg.d_vocab, (n, ctx), generator=torch.Generator().manual_seed(seed))


def _join(rank: int, world: int, init: str) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                                         timeout=timedelta(seconds=120))


def _train_worker(rank, world, init, model_dir, acts, out, ckpt, cfg, die_at):
    from featcircuit import load_model

    _join(rank, world, init)
    model = load_model(model_dir, device="cpu")
    if die_at and rank == 1:  # this rank is killed inside step ``die_at``
        calls, real = {"n": 0}, T._loss

        def dying(*a, **k):
            calls["n"] += 1
            if calls["n"] == 2 * die_at:
                os._exit(3)  # as a kill: no cleanup, no exception for the peers to see
            return real(*a, **k)

        T._loss = dying
    T.train_pair(model, 1, None, T.TrainConfig(**cfg), acts_dir=acts, out=out, ckpt_dir=ckpt,
                 progress=False)
    D.shutdown()


def _edges_worker(rank, world, init, model_dir, out):
    from featcircuit import load_model
    from helpers import random_pair

    _join(rank, world, init)
    model = load_model(model_dir, device="cpu")
    tables = {}
    for with_metric in (False, True):
        rep = Replacement(model, {1: random_pair(model, 1)})
        table = SE.attribute_edges_sharded(rep, _tokens(model, n=10),
                                           batch_size=3, progress=False,
                                           metric=default_metric if with_metric else None)
        tables[str(with_metric)] = table.to_dict()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(tables, f)
    D.shutdown()


def _spawn(fn, args, tmp_path, name="init"):
    init = f"file://{tmp_path / name}"
    mp.spawn(fn, args=(2, init, *args), nprocs=2, join=True)


@pytest.fixture(scope="module")
def harvested(neox, neox_dir, tmp_path_factory):
    """One harvest (8 sequences per shard) and the one-process pair trained on it."""
    tmp = tmp_path_factory.mktemp("dist")
    acts = tmp / "acts"
    ref = T.train_pair(neox, 1, _tokens(neox), T.TrainConfig(**CFG), acts_dir=acts, chunk_size=8,
                       progress=False)
    return acts, ref


def _assert_same_pair(a, b):
    for site in ("resid", "mlp"):
        for name in NAMES:
            torch.testing.assert_close(getattr(getattr(a, site), name), getattr(getattr(b, site), name),
                                       rtol=1e-4, atol=1e-5)


def test_two_ranks_train_the_one_process_pair(neox, neox_dir, harvested, tmp_path):
    acts, ref = harvested
    _spawn(_train_worker, (str(neox_dir), acts, tmp_path / "p", None, CFG, 0), tmp_path)
    two = load_pair(tmp_path / "p")
    _assert_same_pair(two, ref)
    # not trivially equal: the ranks really split the batch (a rank alone trains another pair)
    half = T.train_pair(neox, 1, None, T.TrainConfig(**{**CFG, "batch_size": 50}),
                        acts_dir=acts, progress=False)
    assert (half.mlp.W_enc - ref.mlp.W_enc).abs().max() > 1e-3


def test_killed_rank_resumes_to_the_same_pair(neox_dir, harvested, tmp_path):
    acts, ref = harvested
    ckpt = tmp_path / "ckpt"
    with pytest.raises(mp.ProcessExitedException):
        _spawn(_train_worker, (str(neox_dir), acts, tmp_path / "p", ckpt, CFG, 13), tmp_path, "i1")
    from featcircuit.io import load_state

    assert load_state(ckpt / T.CKPT_FILE)["step"] == 10  # rank 0 saved step 10, then rank 1 died
    assert not (tmp_path / "p").exists()
    _spawn(_train_worker, (str(neox_dir), acts, tmp_path / "p", ckpt, CFG, 0), tmp_path, "i2")
    _assert_same_pair(load_pair(tmp_path / "p"), ref)


def test_sharded_edge_table_equals_one_process(neox, neox_dir, tmp_path):
    from helpers import random_pair

    out = tmp_path / "edges.json"
    _spawn(_edges_worker, (str(neox_dir), str(out)), tmp_path)
    tables = json.loads(out.read_text())
    for with_metric in (False, True):
        two = tables[str(with_metric)]
        one = attribute_edges(Replacement(neox, {1: random_pair(neox, 1)}), _tokens(neox, n=10), batch_size=3,
                              progress=False, metric=default_metric if with_metric else None).to_dict()
        assert two["n_tokens"] == one["n_tokens"] == 10 * 15
        for k in ("src", "dst", "count"):
            assert two[k] == one[k], k
        for k in ("weight", "abs_weight", "max_abs") + (("behav_weight",) if with_metric else ()):
            torch.testing.assert_close(torch.tensor(two[k]), torch.tensor(one[k]), rtol=1e-9,
                                       atol=1e-12)


def test_merge_of_token_halves_is_the_whole_table(neox):
    from helpers import random_pair

    pair, toks = random_pair(neox, 1), _tokens(neox, n=8)
    rep, kw = Replacement(neox, {1: pair}), dict(batch_size=4, progress=False, metric=default_metric)
    whole = attribute_edges(rep, toks, **kw)
    parts = [attribute_edges(rep, toks[i::3], **kw) for i in range(3)]
    merged = SE.merge_edge_tables(parts)
    assert merged.n_tokens == whole.n_tokens
    assert torch.equal(merged.src, whole.src) and torch.equal(merged.dst, whole.dst)
    assert torch.equal(merged.count, whole.count)
    for k in ("weight", "abs_weight", "max_abs", "behav_weight"):
        torch.testing.assert_close(getattr(merged, k), getattr(whole, k), rtol=1e-9, atol=1e-12)
    # the max is a max, not a sum: it differs from abs_weight where an edge fired on several tokens
    several = merged.count > 1
    assert several.any() and (merged.max_abs[several] < merged.abs_weight[several]).all()
