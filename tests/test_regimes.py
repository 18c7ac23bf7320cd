"""The off-policy regime: deterministic, epoch-covering, rank-disjoint batches."""

from __future__ import annotations

from kdlab.data.collate import Encoded
from kdlab.regimes import REGIMES, RegimeContext


def _dataset(n: int) -> list[Encoded]:
    # example i is the tokens [i, i]; its first token identifies it in a batch
    return [Encoded([i, i], [False, True], 1) for i in range(n)]


def _ids(regime, step: int) -> list[int]:  # noqa: ANN001
    return [int(x) for b in regime.micro_batches(step) for x in b["input_ids"][:, 0]]


def test_one_epoch_sees_every_example_once_and_reshuffles() -> None:
    ctx = RegimeContext(_dataset(12), pad_id=0, batch_size=3, grad_accum=2, seed=5)
    regime = REGIMES.get("off_policy")(ctx)
    epoch0 = _ids(regime, 0) + _ids(regime, 1)
    epoch1 = _ids(regime, 2) + _ids(regime, 3)
    assert sorted(epoch0) == list(range(12)) and sorted(epoch1) == list(range(12))
    assert epoch0 != epoch1
    again = REGIMES.get("off_policy")(ctx)
    assert _ids(again, 3) == _ids(regime, 3)  # a fresh regime (a resumed run) sees the same


def test_ranks_split_the_global_batch() -> None:
    def ids(rank: int, world: int, batch: int) -> list[int]:
        ctx = RegimeContext(_dataset(10), 0, batch, 1, seed=1, rank=rank, world_size=world)
        return _ids(REGIMES.get("off_policy")(ctx), 4)

    assert ids(0, 2, 2) + ids(1, 2, 2) == ids(0, 1, 4)


def test_each_process_resumes_from_its_own_regime_state(caplog) -> None:  # noqa: ANN001
    from kdlab.train.trainer import own_regime_state

    saved = [{"buffer": [0]}, {"buffer": [1]}]
    assert own_regime_state(saved, rank=1, world_size=2) == {"buffer": [1]}
    assert own_regime_state(saved, rank=0, world_size=2) == {"buffer": [0]}
    assert own_regime_state(saved, rank=0, world_size=1) == {"buffer": [0]}  # fewer processes
    assert "2 processes, this run has 1" in caplog.text
    assert own_regime_state({"buffer": [7]}, rank=1, world_size=2) == {"buffer": [7]}  # old format
    assert own_regime_state(None, rank=0, world_size=1) == {}
