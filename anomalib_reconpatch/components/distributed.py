"""What a fit needs from ``torch.distributed`` when Lightning runs it on several processes (DDP).

Each process (rank) extracts the features of its own shard of the training images and keeps them:

- :class:`Shard` gives a rank every ``world``-th image of a dataset. Lightning's ``DistributedSampler``
  repeats images to even out the parts and counts them twice; here the training parts are evened out
  with repeats that the model skips by path (:func:`first_sightings`), and the test parts are not evened
  out, so the ranks' features are exactly the training set split in parts (the coreset's size and the
  test metrics then equal one process's);
- :func:`average_gradients` and :func:`broadcast_parameters` make representation training data-parallel;
- :class:`ProcessGroupAgreement` lets the greedy k-center agree on each pick with one collective, so the
  memory bank is chosen from all ranks' patches without any rank holding them all.

Outside DDP (one process) :func:`world` is ``(0, 1)`` and nothing here runs.

Example:
    >>> world()
    (0, 1)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """This process's rank and the number of processes; ``(0, 1)`` outside a distributed run."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def collective_device() -> torch.device:
    """Where collectives need their tensors: the current CUDA device under NCCL, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``values`` over all ranks (a copy; ``values`` itself outside DDP)."""
    if world()[1] == 1:
        return values
    total = values.to(collective_device(), copy=True)
    dist.all_reduce(total)
    return total.to(values.device)


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's ``N_r x D`` rows, concatenated in rank order (``rows`` itself outside DDP)."""
    size = world()[1]
    if size == 1:
        return rows
    device = collective_device()
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(size)]
    dist.all_gather(counts, torch.tensor([len(rows)], device=device))
    longest = int(max(counts))
    padded = torch.zeros(longest, *rows.shape[1:], dtype=rows.dtype, device=device)
    padded[: len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(count)] for part, count in zip(parts, counts, strict=True)]).to(rows.device)


def broadcast_parameters(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Give every rank rank 0's values of ``parameters`` (random initialisations may differ between ranks)."""
    if world()[1] == 1:
        return
    for parameter in parameters:
        dist.broadcast(parameter.data, src=0)


def average_gradients(parameters: Sequence[torch.nn.Parameter]) -> None:
    """Average the gradients of ``parameters`` over all ranks, in place, as DDP's backward would."""
    rank_count = world()[1]
    if rank_count == 1:
        return
    grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
    flat = torch.cat([grad.reshape(-1) for grad in grads])
    dist.all_reduce(flat)
    flat /= rank_count
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


class ProcessGroupAgreement:
    """The greedy k-center's agreement over the ranks of the default process group.

    Each pick gathers every rank's best distance (one small all-gather) and the winning rank broadcasts
    its row; ties go to the lowest rank.
    """

    def __init__(self) -> None:
        self.rank, self.size = world()

    def total(self, values: torch.Tensor) -> torch.Tensor:
        """The sum of ``values`` over all ranks."""
        return all_sum(values)

    def pick(self, distance: torch.Tensor, row: torch.Tensor) -> tuple[bool, torch.Tensor]:
        """The row with the largest distance over all ranks, and whether it is this rank's."""
        device = collective_device()
        distances = [torch.zeros((), dtype=distance.dtype, device=device) for _ in range(self.size)]
        dist.all_gather(distances, distance.detach().reshape(()).to(device, copy=True))
        winner = int(torch.stack(distances).argmax())
        chosen = row.detach().to(device, copy=True) if winner == self.rank else torch.empty_like(row, device=device)
        dist.broadcast(chosen, src=winner)
        return winner == self.rank, chosen.to(row.device)

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's rows, concatenated in rank order."""
        return gather_rows(rows)


def coreset_agreement() -> ProcessGroupAgreement | None:
    """The coreset's agreement over the ranks in DDP; None in one process."""
    return ProcessGroupAgreement() if world()[1] > 1 else None


class Shard(torch.utils.data.Dataset):
    """Every ``size``-th item of an anomalib dataset from ``rank`` on: one rank's part.

    With ``length``, the part is filled up to that many items by repeating its own first items: Lightning's
    training loop runs a collective at every batch, so every rank must run as many training batches as the
    others. The model skips the repeats by their paths (:func:`first_sightings`), so no image counts twice.
    Attributes other than the items (``collate_fn``, ``samples``, ...) are the dataset's, so anomalib's
    dataloaders use it as they would the dataset.

    Args:
        dataset (Any): The dataset to split.
        rank (int): This rank.
        size (int): Number of ranks.
        length (int | None): Items to fill the part up to; None for no repeats. Defaults to ``None``.
    """

    def __init__(self, dataset: Any, rank: int, size: int, length: int | None = None) -> None:
        self.dataset = dataset
        own = list(range(rank, len(dataset), size))
        self.indices = own + own[: max(0, (length or 0) - len(own))]

    def __len__(self) -> int:
        """Number of items in this rank's part."""
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        """The dataset's item at this part's ``index``."""
        return self.dataset[self.indices[index]]

    def __getattr__(self, name: str) -> Any:
        """The dataset's attribute (called only for names the shard does not have)."""
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def first_sightings(paths: Sequence[str] | None, seen: set[str]) -> list[bool] | None:
    """Which images of a batch this rank has not seen before in the epoch; records them as seen.

    Args:
        paths (Sequence[str] | None): The batch's image paths; None (no paths) counts every image.
        seen (set[str]): Paths seen so far, updated in place.

    Returns:
        list[bool] | None: True for each first sighting; None when every image is new.

    Example:
        >>> seen = set()
        >>> first_sightings(["a.png", "b.png"], seen), first_sightings(["c.png", "a.png"], seen)
        (None, [True, False])
    """
    if paths is None:
        return None
    keep = []
    for path in paths:
        keep.append(path not in seen)
        seen.add(path)
    return None if all(keep) else keep


def shard_datamodule(datamodule: Any) -> None:
    """Replace the datamodule's datasets by this rank's :class:`Shard` of each (once; outside DDP, nothing).

    The training part is filled up so that every rank runs as many training batches; the validation
    and test parts are not, so that each test image counts once in the synced metrics.

    Args:
        datamodule (Any): An anomalib datamodule after its ``setup``.

    Raises:
        ValueError: If there are fewer training images than processes.
    """
    rank, size = world()
    if size == 1:
        return
    train = getattr(datamodule, "train_data", None)
    if train is not None and not isinstance(train, Shard):
        if len(train) < size:
            msg = (
                f"{len(train)} training image(s) cannot be split over {size} processes: "
                f"set --trainer.devices to at most {len(train)}."
            )
            raise ValueError(msg)
        datamodule.train_data = Shard(train, rank, size, length=-(-len(train) // size))
    for name in ("val_data", "test_data"):
        dataset = getattr(datamodule, name, None)
        if dataset is not None and not isinstance(dataset, Shard):
            setattr(datamodule, name, Shard(dataset, rank, size))
