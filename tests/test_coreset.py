"""The fast greedy k-center against a brute-force reference and against anomalib's KCenterGreedy."""

from __future__ import annotations

import inspect
import itertools
import threading

import pytest
import torch
from anomalib.models.components import KCenterGreedy

from anomalib_reconpatch.components.coreset import FastKCenterGreedy, ProjectedBound, greedy_k_center
from anomalib_reconpatch.components.threads import torch_threads


def brute_force_k_center(features: torch.Tensor, n_select: int, start: int) -> list[int]:
    """The textbook loop: always add the point farthest from the chosen ones."""
    selected = [start]
    min_dist = (features - features[start]).norm(dim=1)
    for _ in range(n_select - 1):
        idx = int(min_dist.argmax())
        selected.append(idx)
        min_dist = torch.minimum(min_dist, (features - features[idx]).norm(dim=1))
    return selected


def clustered_points(n: int, dim: int, seed: int) -> torch.Tensor:
    """Points around a few centres at different scales, like patch features (float64: no rounding ties)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(12, dim, generator=g, dtype=torch.float64) * 5
    return centres[torch.randint(12, (n,), generator=g)] + torch.randn(n, dim, generator=g, dtype=torch.float64)


@pytest.mark.parametrize(
    ("n", "dim", "n_select", "ball_size"),
    [(500, 4, 60, 16), (3000, 16, 300, 64), (2000, 32, 2000, 32), (3000, 96, 300, 64), (2000, 160, 400, 32)],
)
def test_same_selection_as_brute_force(n: int, dim: int, n_select: int, ball_size: int) -> None:
    features = clustered_points(n, dim, seed=n)
    fast = greedy_k_center(features, n_select, start=7, ball_size=ball_size).tolist()
    assert fast == brute_force_k_center(features, n_select, start=7)


def multiscale_points(n: int, dim: int, seed: int) -> torch.Tensor:
    """Clusters of very different spreads (float64): the balls prune the tight ones, the wide ones need the
    projected bound, so a selection goes back and forth between the two."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(26, dim, generator=g, dtype=torch.float64) * 5
    spreads = torch.exp(1.7 * torch.randn(26, generator=g, dtype=torch.float64))
    which = torch.randint(26, (n,), generator=g)
    return centres[which] + torch.randn(n, dim, generator=g, dtype=torch.float64) * spreads[which, None]


def test_same_selection_as_brute_force_where_ball_and_projected_pruning_alternate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from anomalib_reconpatch.components import coreset

    bound_steps: list[int] = []
    below = coreset.ProjectedBound.below

    def recorded(self: ProjectedBound, centre: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
        bound_steps.append(inspect.currentframe().f_back.f_locals["step"])  # the selection step that asks
        return below(self, centre, bound)

    monkeypatch.setattr(coreset.ProjectedBound, "below", recorded)
    features = multiscale_points(2000, 130, seed=4)
    fast = greedy_k_center(features, 300, start=7, ball_size=16).tolist()
    assert fast == brute_force_k_center(features, 300, start=7)
    # the bound ran again after steps that the balls pruned: the row-order distances it reads kept up with them
    assert any(later > earlier + 1 for earlier, later in itertools.pairwise(bound_steps))


@pytest.mark.parametrize("offset", [0.0, 300.0])
def test_projected_bound_never_rules_out_a_row_at_its_exact_distance(offset: float) -> None:
    # float32 far from the origin, with directions of very different spread: where rounding is worst
    g = torch.Generator().manual_seed(2)
    scales = torch.logspace(-3, 1, 120)
    features = (clustered_points(4000, 120, seed=4).float() * scales + offset).contiguous()
    bound = ProjectedBound(features, 32, g)
    for centre in features[torch.randint(4000, (20,), generator=g)]:
        exact = (features.double() - centre.double()).pow(2).sum(1).float()
        assert len(bound.below(centre, exact)) == len(features)
        assert len(bound.below(centre, exact * 0.0)) < len(features)  # and it does rule rows out


def test_same_selection_as_anomalib_on_its_projection() -> None:
    features = clustered_points(2000, 24, seed=3).float()
    torch.manual_seed(11)
    stock = KCenterGreedy(features, sampling_ratio=0.05)
    stock_idx = stock.select_coreset_idxs()
    projected = stock.features.double()  # anomalib's random projection of the same features
    ours = greedy_k_center(projected, len(stock_idx), start=stock_idx[0], ball_size=32).tolist()
    assert ours == stock_idx


def test_drop_in_interface_and_errors() -> None:
    features = clustered_points(1000, 8, seed=5).float()
    coreset = FastKCenterGreedy(features, sampling_ratio=0.1).sample_coreset()
    assert coreset.shape == (100, 8)
    assert len({tuple(row.tolist()) for row in coreset}) == 100
    with pytest.raises(ValueError, match="selects no point"):
        FastKCenterGreedy(features, sampling_ratio=0.0001)


def test_a_ratio_that_keeps_every_row_returns_them_without_a_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    from anomalib_reconpatch.components import coreset

    def no_selection(*args: object, **kwargs: object) -> None:
        raise AssertionError("a full coreset must not run the greedy selection")

    monkeypatch.setattr(coreset, "greedy_k_center", no_selection)
    features = clustered_points(400, 8, seed=2).float()
    reported = []
    bank = FastKCenterGreedy(features, sampling_ratio=1.0).sample_coreset(progress=reported.append)
    assert torch.equal(bank, features)
    assert reported == [400]


def test_selection_is_the_same_on_one_thread_as_on_all() -> None:
    features = clustered_points(20000, 32, seed=6).float()
    everywhere = greedy_k_center(features, 400, ball_size=64)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = greedy_k_center(features, 400, ball_size=64)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(single, everywhere)
    assert torch.get_num_threads() == previous


def test_a_busy_cpus_selection_on_two_thread_shards_is_the_one_thread_selection_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from anomalib_reconpatch.components import coreset

    features = clustered_points(20000, 40, seed=7).float()
    with torch_threads():
        torch.set_num_threads(1)
        one_thread = greedy_k_center(features, 400)
    set_up_by = []
    balls = coreset._balls
    monkeypatch.setattr(
        coreset,
        "_balls",
        lambda rows, *args: set_up_by.append((threading.current_thread().name, len(rows))) or balls(rows, *args),
    )
    reported: list[int] = []
    with torch_threads():
        torch.set_num_threads(2)  # the count it shards on
        # as the model's fit selects after training chose one thread
        sharded = FastKCenterGreedy(features, 0.02, threads=1).select_coreset_idxs(progress=reported.append)
        assert torch.get_num_threads() == 2
    assert sorted(set_up_by) == [("reconpatch-coreset-0", 10000), ("reconpatch-coreset-1", 10000)]
    assert sharded == one_thread.tolist()
    assert reported[-1] == 400
    assert reported == sorted(reported)


@pytest.mark.parametrize("dim", [40, 160])  # distances kept in ball layout only, and also in row order (bound)
def test_a_selection_handed_over_between_picks_goes_on_to_the_same_rows(
    monkeypatch: pytest.MonkeyPatch, dim: int
) -> None:
    from anomalib_reconpatch.components import coreset

    monkeypatch.setattr(coreset, "HANDOVER_EVERY", 32)
    monkeypatch.setattr(coreset, "HANDOVER_LEFT", 50)
    features = clustered_points(6000, dim, seed=dim).float()
    whole = greedy_k_center(features, 600, ball_size=32)
    stopped: list[coreset.Handover] = []
    first = greedy_k_center(features, 600, ball_size=32, hand_over=stopped)
    assert len(stopped) == 1
    assert 0 < stopped[0].done == len(first) < 600 - 50
    assert torch.equal(stopped[0].centre, features[first[-1]])
    rest = greedy_k_center(features, 600, ball_size=64, resume=stopped[0])  # other balls: the same rows
    assert torch.equal(torch.cat([first, rest]), whole)
    with pytest.raises(ValueError, match="start=None"):
        greedy_k_center(features, 600, start=0, resume=stopped[0])


def test_a_quiet_cpus_selection_hands_over_from_shards_to_one_loop_once_the_balls_prune(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from anomalib_reconpatch.components import coreset

    monkeypatch.setattr(coreset, "HANDOVER_EVERY", 64)
    monkeypatch.setattr(coreset, "HANDOVER_LEFT", 100)
    # float64: float32 has near-ties here that the shards' and one thread's rounding break either way
    clustered = clustered_points(12288, 40, seed=9)
    diffuse = torch.randn(8192, 64, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    with torch_threads():
        torch.set_num_threads(1)
        one_thread = [greedy_k_center(features, 768) for features in (clustered, diffuse)]

    def handovers() -> int:
        return sum("one loop goes on" in record.getMessage() for record in caplog.records)

    reported: list[int] = []
    with torch_threads(), caplog.at_level("INFO", logger=coreset.__name__):
        torch.set_num_threads(2)
        # as the model's fit selects after training chose all threads (768 / rows is exact in binary)
        quiet = [FastKCenterGreedy(features, 768 / len(features), threads=2) for features in (clustered, diffuse)]
        handed_over = quiet[0].select_coreset_idxs(progress=reported.append)
        assert handovers() == 1
        kept = quiet[1].select_coreset_idxs()
    assert handed_over == one_thread[0].tolist()
    assert reported[-1] == 768
    assert reported == sorted(reported)
    # on diffuse rows nearly every step scans every row: the shards select to the end
    assert kept == one_thread[1].tolist()
    assert handovers() == 1


@pytest.mark.parametrize("failing", ["a shard", "the caller"])
def test_a_failure_in_a_shard_or_the_caller_stops_every_shard_and_is_raised(
    monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    from anomalib_reconpatch.components import coreset

    features = clustered_points(20000, 40, seed=8).float()
    balls = coreset._balls

    def failing_balls(rows: torch.Tensor, *args: object) -> tuple[torch.Tensor, torch.Tensor]:
        if threading.current_thread().name == "reconpatch-coreset-1":
            raise MemoryError("shard 1 ran out")
        return balls(rows, *args)

    def interrupted(count: int) -> None:
        raise KeyboardInterrupt

    meetings: list[coreset.ThreadMeeting] = []
    meeting = coreset.ThreadMeeting
    monkeypatch.setattr(coreset, "ThreadMeeting", lambda shards: meetings.append(meeting(shards)) or meetings[-1])
    with torch_threads():
        torch.set_num_threads(2)
        if failing == "a shard":
            monkeypatch.setattr(coreset, "_balls", failing_balls)
            with pytest.raises(MemoryError, match="shard 1 ran out"):
                greedy_k_center(features, 2000, ball_size=64, threads=1)
        else:
            with pytest.raises(KeyboardInterrupt):
                greedy_k_center(features, 4000, ball_size=64, threads=1, progress=interrupted)
            assert len(meetings[0].winners) < 4000  # the shards stopped at the meeting after the interruption
        assert torch.get_num_threads() == 2
    assert len(meetings) == 1
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("reconpatch-coreset")]


@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a CUDA GPU")
def test_a_gpu_embeddings_coreset_is_the_cpu_coreset_back_on_the_gpu() -> None:
    features = clustered_points(3000, 16, seed=4)
    bank = FastKCenterGreedy(features.cuda(), 0.05).sample_coreset()
    assert bank.device.type == "cuda"
    assert torch.equal(bank.cpu(), FastKCenterGreedy(features, 0.05).sample_coreset())
