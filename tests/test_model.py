"""The model on real images: PatchCore-identical features, training, scoring, checkpoints."""

from __future__ import annotations

import copy
import itertools
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.models.image.patchcore.torch_model import PatchcoreModel
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from anomalib_reconpatch import ReConPatch, ReConPatchModel
from anomalib_reconpatch.components.threads import torch_threads
from anomalib_reconpatch.reconpatch import lightning_model, torch_model
from anomalib_reconpatch.reconpatch.ensemble import EnsembleMember
from anomalib_reconpatch.reconpatch.search import nearest_bank_distances, nearest_bank_rows, nearest_rows
from anomalib_reconpatch.reconpatch.similarity import (
    knn_bandwidth,
    pairwise_similarity,
    pseudo_labels,
    squared_distances,
)
from anomalib_reconpatch.reconpatch.torch_model import (
    centred_rotated_frame,
    ema_update,
    ieee_float32,
    reweighted_image_score,
)

from .conftest import BACKBONE, LAYERS


def demo_images(root: Path, split: str = "train/good", count: int = 4) -> torch.Tensor:
    """Real demo images, pre-processed as the model's pre-processor does."""
    from torchvision.io import read_image

    files = sorted((root / "brick" / split).glob("*.png"))[:count]
    images = torch.stack([read_image(str(f)).float() / 255 for f in files])
    return ReConPatch.configure_pre_processor().transform(images)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("k", 0),
        ("alpha", 1.5),
        ("alpha", -0.1),
        ("margin", 0.0),
        ("sigma", 0.0),
        ("momentum", 1.0),
        ("momentum", -0.1),
        ("coreset_sampling_ratio", 0.0),
        ("coreset_sampling_ratio", 1.5),
        ("sigma_unit", "pixels"),
        ("batch_sampling", "random"),
        ("optimizer", "sgd"),
        ("image_score", "members"),
    ],
)
def test_out_of_range_hyperparameters_rejected_at_construction(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"{name}={value!r}"):
        ReConPatch(backbone="not_built_because_validation_comes_first", **{name: value})


def test_ema_update_by_hand() -> None:
    target, online = nn.Linear(2, 2), nn.Linear(2, 2)
    nn.init.zeros_(target.weight), nn.init.zeros_(target.bias)
    nn.init.ones_(online.weight), nn.init.ones_(online.bias)
    ema_update(target, online, momentum=0.9)
    assert torch.allclose(target.weight, torch.full((2, 2), 0.1))
    assert torch.allclose(target.bias, torch.full((2,), 0.1))


def test_nearest_bank_rows_matches_cdist_across_chunks() -> None:
    g = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(50, 8, generator=g), torch.randn(1000, 8, generator=g)
    dist, idx = nearest_bank_rows(queries, bank, chunk=128)
    ref_dist, ref_idx = torch.cdist(queries, bank).min(dim=1)
    assert torch.equal(idx, ref_idx)
    assert torch.allclose(dist, ref_dist, atol=1e-4)
    assert torch.allclose(nearest_bank_distances(queries, bank, chunk=128), ref_dist, atol=1e-4)


def test_nearest_rows_are_cdists_top_k_nearest_first_across_chunks() -> None:
    g = torch.Generator().manual_seed(1)
    queries, bank = torch.randn(50, 8, generator=g), torch.randn(300, 8, generator=g)
    reference = torch.cdist(queries, bank).topk(4, dim=1, largest=False).indices
    assert torch.equal(nearest_rows(queries, bank, 4, chunk=16), reference)
    assert torch.equal(nearest_rows(bank, bank, 2, chunk=64)[:, 0], torch.arange(300))  # a row is its own nearest


def test_centred_rotated_frame_keeps_every_distance_and_centres_the_bank() -> None:
    gen = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(6, 6, generator=gen), torch.randn(6, generator=gen)
    bank = torch.randn(40, 6, generator=gen) + 25.0  # far off the origin, as trained banks are
    x = torch.randn(30, 6, generator=gen)
    rng_state = torch.get_rng_state()
    new_weight, new_bias, new_bank = centred_rotated_frame(weight, bias, bank)
    assert torch.equal(torch.get_rng_state(), rng_state)
    before = torch.cdist(x @ weight.T + bias, bank)
    after = torch.cdist(x @ new_weight.T + new_bias, new_bank)
    assert torch.allclose(after, before, atol=1e-4)
    assert new_bank.mean(0).abs().max() < 1e-5
    assert new_bank.abs().max() < 0.5 * bank.abs().max()
    rotation = new_weight.double() @ torch.linalg.inv(weight.double())
    assert torch.allclose(rotation @ rotation.T, torch.eye(6, dtype=torch.float64), atol=1e-5)
    assert not torch.allclose(rotation, torch.eye(6, dtype=torch.float64), atol=0.1)
    again = centred_rotated_frame(weight, bias, bank)
    assert all(torch.equal(a, b) for a, b in zip(again, (new_weight, new_bias, new_bank), strict=True))


def test_separable_blur_is_anomalibs_blur() -> None:
    """An impulse comes out as anomalib's 2-D Gaussian kernel; any map as anomalib's blur gives it."""
    from anomalib.models.image.patchcore.anomaly_map import AnomalyMapGenerator as PatchcoreMaps

    from anomalib_reconpatch.reconpatch.anomaly_map import AnomalyMapGenerator

    ours, stock = AnomalyMapGenerator(), PatchcoreMaps()
    impulse = torch.zeros(1, 1, 65, 65)
    impulse[..., 32, 32] = 1.0
    kernel = stock.blur.kernel[0, 0]
    assert torch.allclose(ours.blur(impulse)[0, 0, 16:49, 16:49], kernel, atol=1e-7)
    scores = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 10
    assert torch.allclose(ours(scores, (256, 256)), stock(scores, (256, 256))[:, 0], atol=1e-4)
    assert ours.state_dict().keys() == stock.state_dict().keys()


def test_image_score_reweights_the_top_patch_by_its_neighbours_isolation() -> None:
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])
    patches = torch.tensor([[[0.5, 0.0], [4.0, 0.0]]])  # one image; the top patch (4, 0) is 3 from bank row (1, 0)
    distances = nearest_bank_distances(patches[0], bank)[None]
    assert torch.allclose(distances, torch.tensor([[0.5, 3.0]]))
    # Support of (1, 0): itself and (0, 0), at 3 and 4 from the top patch: weight 1 - e^3 / (e^3 + e^4) = e / (1 + e).
    score = reweighted_image_score(distances, patches, bank, num_neighbors=2)
    assert torch.allclose(score, torch.tensor([3.0 * math.e / (1 + math.e)]))
    table = torch.tensor([[0, 1], [1, 0], [2, 1]])  # the exports' form: support looked up, neighbour as a convolution
    assert torch.allclose(reweighted_image_score(distances, patches, bank, 2, table, convolution=True), score)
    assert torch.allclose(reweighted_image_score(distances, patches, bank, num_neighbors=1), torch.tensor([3.0]))


def test_patch_features_are_patchcores(lite_weights: None, demo_root: Path) -> None:
    images = demo_images(demo_root)
    ours = ReConPatchModel(BACKBONE, LAYERS).eval().patch_features(images)
    patchcore = PatchcoreModel(layers=LAYERS, backbone=BACKBONE).train()
    with torch.no_grad():
        reference = patchcore(images)  # training mode returns the flat patch embedding
    assert ours.shape == (4, 152, 32, 32)
    assert torch.equal(ours.permute(0, 2, 3, 1).reshape(-1, 152), reference)
    pooled = ReConPatchModel(BACKBONE, LAYERS, embedding_dim=64).eval().patch_features(images)
    assert pooled.shape == (4, 64, 32, 32)


def test_pairwise_similarity_is_informative_on_real_features(lite_weights: None, demo_root: Path) -> None:
    features = ReConPatchModel(BACKBONE, LAYERS).patch_features(demo_images(demo_root))
    patches = features.permute(0, 2, 3, 1).reshape(-1, 152)
    batch = patches[torch.randperm(len(patches), generator=torch.Generator().manual_seed(0))[:512]]
    sq = squared_distances(batch).fill_diagonal_(float("nan"))
    raw = pairwise_similarity(sq, 1.0)  # the paper's sigma=1 on raw features: no pair is similar
    assert raw.nan_to_num(0).max() < 1e-6
    scaled = pairwise_similarity(sq, knn_bandwidth(sq.nan_to_num(0), 5))
    off = scaled[~torch.isnan(scaled)]
    assert 0.005 < (off > 0.3).float().mean() < 0.2  # close pairs are similar, most pairs are not
    assert off.median() < 0.1


def allow_tf32_the_legacy_way() -> None:
    """Lightning's suggestion and cuDNN's default, through torch's legacy setters."""
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True


def allow_tf32_per_backend() -> None:
    """Torch's per-backend settings, after which its legacy getters raise."""
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"


TF32_SETTINGS = {"legacy": allow_tf32_the_legacy_way, "per_backend": allow_tf32_per_backend}


PRECISION_SETTINGS = (
    torch.backends.cuda.matmul,
    torch.backends.cudnn.conv,
    torch.backends.cudnn.rnn,
    torch.backends.mkldnn.matmul,
    torch.backends.mkldnn.conv,
)


@pytest.fixture(params=sorted(TF32_SETTINGS))
def tf32_allowed(request: pytest.FixtureRequest) -> Iterator[str]:
    """TF32 allowed for CUDA matmuls and cuDNN convolutions, set one way or the other; every setting restored."""
    legacy = torch.get_float32_matmul_precision()
    saved = [setting.fp32_precision for setting in PRECISION_SETTINGS]
    TF32_SETTINGS[request.param]()
    yield request.param
    torch.set_float32_matmul_precision(legacy)  # torch keeps this apart from the per-backend settings
    for setting, value in zip(PRECISION_SETTINGS, saved, strict=True):
        setting.fp32_precision = value


def tf32_state() -> tuple[str, str]:
    """What CUDA matmuls and cuDNN convolutions run float32 in."""
    return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision


def test_full_float32_holds_only_inside_cuda_work_and_the_users_tf32_choice_returns(tf32_allowed: str) -> None:
    with ieee_float32(torch.device("cpu")):
        assert tf32_state() == ("tf32", "tf32")
    with ieee_float32(torch.device("cuda")):  # only settings: no GPU needed
        assert tf32_state() == ("ieee", "ieee")
    assert tf32_state() == ("tf32", "tf32")
    with pytest.raises(KeyboardInterrupt), ieee_float32(torch.device("cuda")):
        raise KeyboardInterrupt
    assert tf32_state() == ("tf32", "tf32")
    first, second = ieee_float32(torch.device("cuda")), ieee_float32(torch.device("cuda"))
    first.__enter__()
    second.__enter__()  # another thread's overlapping forward
    first.__exit__(None, None, None)
    assert tf32_state() == ("ieee", "ieee")  # the second user is still inside
    second.__exit__(None, None, None)
    assert tf32_state() == ("tf32", "tf32")
    if tf32_allowed == "legacy":  # the user's own getters still answer afterwards
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cudnn.allow_tf32


def test_every_backbone_and_f_call_of_training_fit_and_scoring_runs_in_full_float32(
    lite_weights: None, demo_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the guard acts here as on a GPU; hooks note the settings at every backbone and f call, also on the
    # feature threads of split_over_threads and in the ensemble member's own training step
    real = torch_model.ieee_float32

    @contextmanager
    def as_on_a_gpu(device: torch.device) -> Iterator[None]:
        del device
        with real(torch.device("cuda")):
            yield

    monkeypatch.setattr(torch_model, "ieee_float32", as_on_a_gpu)
    monkeypatch.setattr(lightning_model, "ieee_float32", as_on_a_gpu)
    images = demo_images(demo_root)
    seen: dict[str, list[tuple[str, str]]] = {"backbone": [], "f": []}
    for model in (
        ReConPatch(BACKBONE, LAYERS, num_steps=3),
        EnsembleMember(backbone=BACKBONE, layers=LAYERS, num_steps=3),
    ):
        model.model.feature_extractor.register_forward_pre_hook(lambda *_: seen["backbone"].append(tf32_state()))
        model.model.representation.register_forward_pre_hook(lambda *_: seen["f"].append(tf32_state()))
        model.on_train_epoch_start()
        model.training_step(SimpleNamespace(image=images))
        model.fit()
        model.model.eval()(images[:2])
    assert len(seen["backbone"]) >= 4  # two trainings (one on two threads) and two scorings
    assert len(seen["f"]) >= 6  # three steps each, the embedding and the scoring
    assert set(seen["backbone"]) | set(seen["f"]) == {("ieee", "ieee")}
    assert tf32_state() == ("none", "tf32")  # torch's defaults, restored by the last user


@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a CUDA GPU")
def test_a_gpu_scores_real_images_as_the_cpu_does_with_tf32_allowed(
    lite_weights: None, demo_root: Path, tf32_allowed: str
) -> None:
    # TF32 keeps 10 mantissa bits: distances about 1e-3 off, five times this tolerance
    model = ReConPatchModel(BACKBONE, LAYERS).eval()
    images = demo_images(demo_root, "test/patch", 3)
    with torch.no_grad():
        model.memory_bank = model.train()(demo_images(demo_root))[::7]
        model.fold_bank_frame()
        cpu = model.eval()(images)
        gpu = model.cuda()(images.cuda())
    scale = float(cpu.anomaly_map.max())
    assert torch.allclose(gpu.anomaly_map.cpu(), cpu.anomaly_map, atol=2e-4 * scale)
    assert torch.allclose(gpu.pred_score.cpu(), cpu.pred_score, atol=2e-4 * scale)


@pytest.fixture(scope="module")
def trained(lite_weights: None, demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """ReConPatch trained by anomalib's Engine on the demo brick category."""
    torch.manual_seed(0)
    datamodule = MVTecAD(root=demo_root, category="brick", num_workers=0, train_batch_size=8, eval_batch_size=8)
    model = ReConPatch(backbone=BACKBONE, layers=LAYERS, num_steps=150, coreset_sampling_ratio=0.05)
    watch = ValidationStartWatch()
    engine = Engine(default_root_dir=tmp_path_factory.mktemp("results"), logger=False, callbacks=[watch])
    engine.fit(model=model, datamodule=datamodule)
    metrics = engine.test(model=model, datamodule=datamodule)[0]
    return model, engine, datamodule, metrics, watch


class ValidationStartWatch(Callback):
    """Notes, each time validation starts, whether the model had already built its memory bank."""

    def __init__(self) -> None:
        self.fitted: list[bool] = []

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer
        self.fitted.append(bool(pl_module._is_fitted) and pl_module.model.memory_bank.numel() > 0)


def test_the_fit_is_done_before_validation_starts_its_loader(trained: tuple) -> None:
    # callbacks' on_validation_start runs after Lightning has created the validation loader's iterator
    assert trained[4].fitted == [True]


def test_training_moves_f_and_builds_bank_in_f_space(trained: tuple) -> None:
    model, _, _, metrics, _ = trained
    f = model.model.representation
    assert not torch.allclose(f.weight, torch.eye(152), atol=1e-3)
    assert model.model.memory_bank.shape == (int(24 * 32 * 32 * 0.05), 152)
    assert set(model.fit_timings) == {"features_s", "representation_s", "coreset_s"}
    assert metrics["image_AUROC"] >= 0.9
    assert metrics["pixel_AUROC"] >= 0.9


def test_fit_leaves_the_bank_centred_and_folding_again_keeps_the_scores(trained: tuple, demo_root: Path) -> None:
    model = trained[0].eval()
    assert model.model.memory_bank.mean(0).abs().max() < 1e-4
    images = demo_images(demo_root, "test/patch", 3)
    folded = copy.deepcopy(model)
    folded.model.fold_bank_frame()
    assert not torch.allclose(folded.model.memory_bank, model.model.memory_bank, atol=0.1)
    with torch.no_grad():
        before, after = model.model(images), folded.model(images)
    scale = float(before.anomaly_map.max() - before.anomaly_map.min())
    assert torch.allclose(after.pred_score, before.pred_score, atol=1e-4 * scale)
    assert torch.allclose(after.anomaly_map, before.anomaly_map, atol=1e-4 * scale)


def test_eval_forward_any_batch_size(trained: tuple, demo_root: Path) -> None:
    model = trained[0].eval()
    images = demo_images(demo_root, "test/patch", 3)
    with torch.no_grad():
        three = model.model(images)
        one = model.model(images[:1])
    assert three.pred_score.shape == (3,)
    assert three.anomaly_map.shape == (3, 256, 256)
    assert torch.allclose(one.pred_score, three.pred_score[:1], atol=1e-5)


def test_checkpoint_round_trip_gives_identical_scores(trained: tuple, tmp_path: Path) -> None:
    model, engine, datamodule, _, _ = trained
    path = tmp_path / "reconpatch.ckpt"
    engine.trainer.save_checkpoint(path)
    reloaded = ReConPatch.load_from_checkpoint(path)
    before = engine.predict(model=model, datamodule=datamodule)
    after = Engine(default_root_dir=tmp_path, logger=False).predict(model=reloaded, datamodule=datamodule)
    assert torch.equal(reloaded.model.memory_bank, model.model.memory_bank)
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a.pred_score, b.pred_score)
        assert torch.equal(a.anomaly_map, b.anomaly_map)


def test_the_map_image_score_is_the_largest_pixel_of_the_same_map(trained: tuple, demo_root: Path) -> None:
    model = trained[0].eval()
    assert model.model.image_score == "map"  # the default
    images = demo_images(demo_root, "test/patch", 3)
    with torch.no_grad():
        by_map = model.model(images)
        model.model.image_score = "patches"
        try:
            by_patches = model.model(images)
        finally:
            model.model.image_score = "map"
    assert torch.equal(by_map.anomaly_map, by_patches.anomaly_map)
    assert torch.equal(by_map.pred_score, by_patches.anomaly_map.flatten(1).amax(1))
    assert not torch.allclose(by_map.pred_score, by_patches.pred_score)


def test_a_checkpoint_can_be_rescored_by_patchcores_image_score(trained: tuple, tmp_path: Path) -> None:
    model, engine, _, _, _ = trained
    path = tmp_path / "reconpatch.ckpt"
    engine.trainer.save_checkpoint(path)
    assert ReConPatch.load_from_checkpoint(path).model.image_score == "map"
    rescored = ReConPatch.load_from_checkpoint(path, image_score="patches")
    assert rescored.hparams["image_score"] == "patches"
    assert rescored.model.image_score == "patches"
    assert torch.equal(rescored.model.memory_bank, model.model.memory_bank)


def test_testing_a_checkpoint_under_another_image_score_is_refused_naming_the_flag(
    trained: tuple, tmp_path: Path
) -> None:
    # anomalib test --ckpt_path builds the model from the command line, then restores the checkpoint into it
    _, engine, datamodule, _, _ = trained
    path = tmp_path / "reconpatch.ckpt"
    engine.trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["hyper_parameters"]["image_score"]
    other = next(score for score in ("patches", "map") if score != saved)
    rebuilt = ReConPatch(backbone=BACKBONE, layers=LAYERS, image_score=other)
    tester = Engine(default_root_dir=tmp_path / "results", logger=False)
    expected = rf"image_score='{saved}' and its image threshold.*--model\.image_score {saved}"
    with pytest.raises(ValueError, match=expected):
        tester.test(model=rebuilt, datamodule=datamodule, ckpt_path=path)


def test_a_checkpoint_from_before_the_image_score_setting_keeps_patchcores(trained: tuple, tmp_path: Path) -> None:
    _, engine, _, _, _ = trained
    path = tmp_path / "reconpatch.ckpt"
    engine.trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint["hyper_parameters"]["image_score"]
    rebuilt = ReConPatch(backbone=BACKBONE, layers=LAYERS, image_score="map")
    rebuilt.on_load_checkpoint(checkpoint)
    assert rebuilt.model.image_score == rebuilt.hparams["image_score"] == "patches"


def test_the_step_hook_sees_every_step_and_leaves_the_training_unchanged() -> None:
    features = torch.randn(600, 152, generator=torch.Generator().manual_seed(0))

    def trained(on_step: object) -> torch.Tensor:
        model = ReConPatch(backbone=BACKBONE, layers=LAYERS, pre_trained=False, num_steps=6, patches_per_step=48)
        torch.manual_seed(1)
        with torch.enable_grad():
            model.train_representation(features, on_step=on_step)
        return model.model.representation.weight.detach().clone()

    seen = []
    hooked = trained(seen.append)
    assert [state.step for state in seen] == list(range(6))
    assert all(state.batch.shape == (48, 152) and state.weights.shape == (48, 48) for state in seen)
    assert all(math.isfinite(state.loss) for state in seen)
    assert torch.equal(hooked, trained(None))
    assert not torch.equal(hooked, torch.eye(152))


def hooked_steps(model: ReConPatch, features: torch.Tensor) -> list[tuple[object, nn.Module, nn.Module]]:
    """Train ``model``'s ``f`` on ``features``; each step's hook state with copies of the targets it saw.

    The hook runs before the step's update and EMA move, so a step's copies are the targets that label
    the next batch (and, for the first step, its own).
    """
    seen = []

    def keep(state: object) -> None:
        seen.append((state, copy.deepcopy(state.target_f), copy.deepcopy(state.target_g)))

    with torch.enable_grad():
        model.train_representation(features, on_step=keep)
    return seen


def test_a_steps_labels_come_from_the_targets_before_the_previous_steps_ema_move() -> None:
    from anomalib_reconpatch.reconpatch.similarity import pseudo_labels

    features = torch.randn(600, 152, generator=torch.Generator().manual_seed(0))
    model = ReConPatch(
        backbone=BACKBONE, layers=LAYERS, pre_trained=False, num_steps=5, patches_per_step=48, momentum=0.5
    )
    torch.manual_seed(1)
    targets = hooked_steps(model, features)

    def labels(state: object, f: nn.Module, g: nn.Module) -> torch.Tensor:
        return pseudo_labels(g(f(state.batch)), model.k, model.alpha, model.sigma, model.sigma_unit)

    with torch.no_grad():
        first, f, g = targets[0]
        assert torch.equal(first.weights, labels(first, f, g))
        for (_, f, g), (state, f_after, g_after) in itertools.pairwise(targets):
            assert torch.equal(state.weights, labels(state, f, g))
            # a momentum of 0.5 moves the targets far in a step: labels from the moved ones differ
            assert not torch.equal(state.weights, labels(state, f_after, g_after))


def test_training_length_follows_the_data_unless_num_steps_is_given() -> None:
    from anomalib_reconpatch.reconpatch.lightning_model import MAX_REPRESENTATION_STEPS, representation_steps

    # 2.4 passes of 512-patch steps: bottle's 209 images (1,024 patches each) get the measured 1,004
    assert representation_steps(209 * 1024, 512, None) == 1004
    assert representation_steps(60 * 1024, 512, None) == 288
    assert representation_steps(5 * 1024, 512, None) == 24
    assert representation_steps(10, 512, None) == 1
    assert representation_steps(10**9, 512, None) == MAX_REPRESENTATION_STEPS
    assert representation_steps(60 * 1024, 512, 1000) == 1000
    assert representation_steps(60 * 1024, 512, 0) == 0


def test_default_training_runs_as_many_steps_as_the_data_asks() -> None:
    features = torch.randn(500, 152, generator=torch.Generator().manual_seed(0))
    model = ReConPatch(backbone=BACKBONE, layers=LAYERS, pre_trained=False, patches_per_step=48)
    seen = []
    torch.manual_seed(1)
    with torch.enable_grad():
        model.train_representation(features, on_step=seen.append)
    assert len(seen) == math.ceil(2.4 * 500 / 48) == 25


@pytest.mark.parametrize(
    ("sigma_unit", "sigma", "expected"), [("normalized", None, 0.1), ("knn", None, 1.0), ("normalized", 0.3, 0.3)]
)
def test_unset_sigma_takes_its_units_default_and_a_given_one_wins(
    sigma_unit: str, sigma: float | None, expected: float
) -> None:
    model = ReConPatch(backbone=BACKBONE, layers=LAYERS, pre_trained=False, sigma=sigma, sigma_unit=sigma_unit)
    assert model.sigma == expected


def test_default_training_labels_pairs_on_unit_length_targets_with_sigma_0_1() -> None:
    features = torch.randn(600, 152, generator=torch.Generator().manual_seed(0))
    model = ReConPatch(backbone=BACKBONE, layers=LAYERS, pre_trained=False, num_steps=3, patches_per_step=48)
    seen = hooked_steps(model, features)
    # a batch's labels come from the targets that the previous step's hook saw (the first's from its own)
    labelled_by = [seen[0][1:], *(targets[1:] for targets in seen[:-1])]
    for (state, _, _), (f, g) in zip(seen, labelled_by, strict=True):
        z = g(f(state.batch))
        expected = pseudo_labels(z, model.k, model.alpha, 0.1, "normalized")
        assert torch.equal(state.weights, expected)
        assert not torch.allclose(state.weights, pseudo_labels(z, model.k, model.alpha, 1.0, "knn"))


def test_neighbour_batches_with_normalized_sigma_train_f_on_distinct_rows() -> None:
    features = torch.randn(600, 152, generator=torch.Generator().manual_seed(0))
    model = ReConPatch(
        backbone=BACKBONE,
        layers=LAYERS,
        pre_trained=False,
        num_steps=6,
        patches_per_step=48,
        batch_sampling="neighbors",
        sigma_unit="normalized",
    )
    seen = []
    with torch.enable_grad():
        model.train_representation(features, on_step=seen.append)
    assert len(seen) == 6
    assert all(len(torch.unique(state.batch, dim=0)) == 48 for state in seen)
    assert all(math.isfinite(state.loss) for state in seen)
    assert not torch.equal(model.model.representation.weight, torch.eye(152))


def test_adamp_optimizer_trains_f_differently_from_adamw() -> None:
    from timm.optim import AdamP

    features = torch.randn(600, 152, generator=torch.Generator().manual_seed(0))
    weights = {}
    for name in ("adamw", "adamp"):
        torch.manual_seed(0)
        model = ReConPatch(
            backbone=BACKBONE, layers=LAYERS, pre_trained=False, num_steps=6, patches_per_step=48, optimizer=name
        )
        optimizer, _ = model.configure_representation_optimizer(list(model.model.representation.parameters()), 6)
        assert isinstance(optimizer, AdamP) == (name == "adamp")
        with torch.enable_grad():
            model.train_representation(features)
        weights[name] = model.model.representation.weight.detach().clone()
    assert all(torch.isfinite(weight).all() and not torch.equal(weight, torch.eye(152)) for weight in weights.values())
    assert not torch.equal(weights["adamw"], weights["adamp"])


def test_a_training_batch_passes_the_backbone_as_a_part_per_thread_giving_the_whole_batchs_features(
    lite_weights: None, demo_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from anomalib.data import ImageBatch

    images = demo_images(demo_root, count=5)  # an odd count: parts of 3 and 2 images
    model = ReConPatch(backbone=BACKBONE, layers=LAYERS)
    model.on_train_epoch_start()
    with torch.no_grad():
        whole = model.model(images)
    passes = []
    backbone = model.model.patch_features

    def spy(part: torch.Tensor) -> torch.Tensor:
        passes.append((threading.current_thread().name, len(part), torch.get_num_threads(), torch.is_grad_enabled()))
        return backbone(part)

    monkeypatch.setattr(model.model, "patch_features", spy)
    with torch_threads():
        torch.set_num_threads(2)  # the count it splits on
        model.training_step(ImageBatch(image=images, image_path=[f"{i}.png" for i in range(5)]))
        assert torch.get_num_threads() == 2
    assert sorted(passes) == [("MainThread", 3, 1, True), ("reconpatch-features_0", 2, 1, True)]
    stored = torch.cat(model.feature_store)
    assert stored.shape == whole.shape == (5 * 32 * 32, 152)
    # the same patches in the same order (images differ by far more); one thread rounds otherwise than two
    assert torch.allclose(stored, whole, rtol=0, atol=1e-4)
