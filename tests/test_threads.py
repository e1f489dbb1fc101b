"""The thread chooser of representation training: all threads while they are faster, one while it is."""

from __future__ import annotations

import threading

import pytest
import torch

from anomalib_reconpatch.components.threads import ThreadChooser, split_over_threads, torch_threads


def run(chooser: ThreadChooser, steps: range, seconds: dict[int, float]) -> list[int]:
    """Drive ``chooser`` over ``steps`` with a fixed step time per thread count; the counts it chose."""
    chosen = []
    for step in steps:
        threads = chooser.threads(step)
        chosen.append(threads)
        chooser.record(step, seconds[threads])
    return chosen


def test_a_quiet_machine_keeps_all_threads_after_probing_one() -> None:
    chooser = ThreadChooser(all_threads=2, probe=3, period=20)
    chosen = run(chooser, range(20), {2: 0.026, 1: 0.041})
    assert chosen[:6] == [1, 1, 1, 2, 2, 2]
    assert set(chosen[6:]) == {2}


def test_a_busy_machine_moves_to_one_thread_after_one_slow_step_and_back_when_the_load_goes() -> None:
    chooser = ThreadChooser(all_threads=2, probe=3, period=20)
    busy = run(chooser, range(40), {2: 0.9, 1: 0.12})
    assert busy[:4] == [1, 1, 1, 2]  # the all-thread probe ends after its first, slow step
    assert set(busy[4:]) == {1}  # a clear win: the next window comes 40 steps after the first
    quiet = run(chooser, range(40, 80), {2: 0.026, 1: 0.041})
    assert quiet[:6] == [1, 1, 1, 2, 2, 2]
    assert set(quiet[6:]) == {2}


def test_a_one_thread_probe_that_got_a_third_of_a_core_skips_the_all_thread_probe() -> None:
    def drive(chooser: ThreadChooser, steps: range, share: float) -> list[int]:
        chosen = []
        for step in steps:
            threads = chooser.threads(step)
            chosen.append(threads)
            seconds = 0.03 if threads == 1 else 0.9
            chooser.record(step, seconds, cpu_seconds=share * seconds)
        return chosen

    busy = ThreadChooser(all_threads=2, probe=3, period=20)
    assert drive(busy, range(60), share=0.33) == [1] * 60  # no all-thread step, not even at the next window
    assert (busy.verdict, busy.gap) == (1, 80)
    quiet = ThreadChooser(all_threads=2, probe=3, period=20)
    assert drive(quiet, range(4), share=0.95) == [1, 1, 1, 2]  # on a core all the time: it probes
    without_cpu_times = ThreadChooser(all_threads=2, probe=3, period=20)
    assert run(without_cpu_times, range(4), {2: 0.9, 1: 0.03}) == [1, 1, 1, 2]


def test_probes_back_off_while_one_count_clearly_wins_and_return_on_a_close_call() -> None:
    chooser = ThreadChooser(all_threads=2, probe=3, period=20, max_period=80)
    gaps = []
    for start in range(0, 400, 10):
        run(chooser, range(start, start + 10), {2: 0.9, 1: 0.12})
        gaps.append(chooser.gap)
    assert sorted(set(gaps)) == [40, 80]
    run(chooser, range(400, 600), {2: 0.030, 1: 0.033})  # within 1.5x: probed every 20 steps again
    assert chooser.gap == 20


def test_one_slow_probe_step_does_not_decide_alone() -> None:
    chooser = ThreadChooser(all_threads=2, probe=3, period=20)
    for step, seconds in enumerate([0.5, 0.041, 0.040, 0.026, 0.027, 0.028]):  # a hiccup on the first step
        chooser.record(step, seconds)
    assert chooser.threads(6) == 2


def test_a_count_measured_just_before_is_kept_until_the_first_period_ends() -> None:
    chooser = ThreadChooser(all_threads=2, probe=3, period=20, start=1)
    assert chooser.verdict == 1
    chosen = run(chooser, range(30), {2: 0.026, 1: 0.041})
    assert chosen[:20] == [1] * 20  # no probe while the start's measurement is fresh
    assert chosen[20:26] == [1, 1, 1, 2, 2, 2]
    assert chooser.verdict == 2


def test_the_verdict_is_what_the_last_finished_probe_chose() -> None:
    chooser = ThreadChooser(all_threads=2, probe=3, period=20)
    assert chooser.verdict is None
    run(chooser, range(3), {2: 0.9, 1: 0.12})
    assert chooser.verdict is None  # the window has timed one count only
    run(chooser, range(3, 10), {2: 0.9, 1: 0.12})
    assert chooser.verdict == 1


def test_a_single_thread_has_nothing_to_choose() -> None:
    chooser = ThreadChooser(all_threads=1)
    assert run(chooser, range(10), {1: 0.05}) == [1] * 10


def test_thread_count_is_restored_after_the_block() -> None:
    before = torch.get_num_threads()
    with torch_threads():
        torch.set_num_threads(1)
    assert torch.get_num_threads() == before


def test_training_gives_the_same_f_with_the_next_labels_beside_a_step_or_in_turn_on_all_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from anomalib_reconpatch import ReConPatch
    from anomalib_reconpatch.reconpatch import lightning_model

    from .conftest import BACKBONE, LAYERS

    if torch.get_num_threads() < 2:
        pytest.skip("one thread only: nothing to compare")
    features = torch.randn(3000, 152, generator=torch.Generator().manual_seed(0))
    labels = lightning_model.ReConPatch.representation_labels
    trained, labelled_on = [], []
    for threads in (1, torch.get_num_threads()):
        monkeypatch.setattr(lightning_model, "REPRESENTATION_THREADS", threads)
        model = ReConPatch(backbone=BACKBONE, layers=LAYERS, pre_trained=False, num_steps=30, learning_rate=1e-3)
        names: list[str] = []

        def spy(*args: object, model: ReConPatch = model, names: list[str] = names) -> torch.Tensor:
            names.append(threading.current_thread().name)
            return labels(model, *args)

        monkeypatch.setattr(model, "representation_labels", spy)
        torch.manual_seed(1)
        with torch.enable_grad():
            model.train_representation(features)
        trained.append(model.model.representation.weight.detach().clone())
        labelled_on.append(names)
    # on one thread a step's successor's labels run on a second thread beside it; on all, in turn
    assert labelled_on[0][0] == "MainThread"
    assert all(name.startswith("reconpatch-labels") for name in labelled_on[0][1:])
    assert labelled_on[1] == ["MainThread"] * 30
    assert torch.equal(trained[0], trained[1])


def test_training_returns_the_count_its_probe_chose_and_the_coreset_sets_up_on_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from anomalib_reconpatch import ReConPatch
    from anomalib_reconpatch.components import coreset

    from .conftest import BACKBONE, LAYERS

    if torch.get_num_threads() < 2:
        pytest.skip("one thread only: nothing to choose")

    class BusyCpu(ThreadChooser):
        """A chooser whose all-thread steps are timed as a busy CPU times them."""

        def record(self, step: int, seconds: float, cpu_seconds: float | None = None) -> None:
            del cpu_seconds  # a core to itself: the all-thread probe runs
            super().record(step, 0.9 if torch.get_num_threads() > 1 else 0.12)

    monkeypatch.setattr("anomalib_reconpatch.reconpatch.lightning_model.ThreadChooser", BusyCpu)
    features = torch.randn(3000, 152, generator=torch.Generator().manual_seed(0))
    model = ReConPatch(backbone=BACKBONE, layers=LAYERS, pre_trained=False, num_steps=10)
    with torch.enable_grad():
        verdict = model.train_representation(features)
    assert verdict == 1
    set_up_on = []
    balls = coreset._balls
    monkeypatch.setattr(coreset, "_balls", lambda *args: set_up_on.append(torch.get_num_threads()) or balls(*args))
    before = torch.get_num_threads()
    selected = coreset.greedy_k_center(features, 30, threads=verdict)
    assert set_up_on == [1]
    assert torch.get_num_threads() == before
    assert torch.equal(selected, coreset.greedy_k_center(features, 30))


def test_a_batch_split_over_threads_keeps_the_callers_modes_and_thread_count_and_raises_a_halfs_error() -> None:
    seen, failing = [], []

    def rows(images: torch.Tensor) -> torch.Tensor:
        seen.append((threading.current_thread().name, len(images), torch.is_grad_enabled(), torch.get_num_threads()))
        if failing and threading.current_thread().name != "MainThread":
            raise ValueError("the second half failed")
        return images.repeat_interleave(2, dim=0)  # two rows per image, in order

    batch = torch.arange(5.0)[:, None].repeat(1, 3)
    with torch_threads():
        torch.set_num_threads(2)
        with torch.no_grad():
            split = split_over_threads(rows, batch)
        assert torch.equal(split, batch.repeat_interleave(2, dim=0))
        assert sorted(seen) == [("MainThread", 3, False, 1), ("reconpatch-features_0", 2, False, 1)]
        assert torch.get_num_threads() == 2
        failing.append(True)
        with pytest.raises(ValueError, match="second half"):
            split_over_threads(rows, batch)
        assert torch.get_num_threads() == 2
        seen.clear()
        split_over_threads(rows, batch[:1])  # one image: no second half
        torch.set_num_threads(1)
        split_over_threads(rows, batch)  # one thread: nothing to split over
    assert seen == [("MainThread", 1, True, 2), ("MainThread", 5, True, 1)]
