"""Reusable pieces that ReConPatch builds on, each independent of the model and of the tools.

- ``backbone``: a frozen timm feature extractor that fails early, saying what to do, when its name,
  layers or offline weights are wrong (``hub_cache``: where the weights are looked for).
- ``coreset``: an exact greedy k-center coreset that prunes with the triangle inequality.
- ``spill``: training features beyond a memory budget, in a temporary memory-mapped file.
- ``images``: the image reader that scales 16-bit grayscale instead of clipping it (no torch).
- ``preflight``: every image of a stage decoded before any work, each unreadable file named.
- ``failures``: the files behind failures that come before the model's checks (broken links, unpaired
  masks, empty or truncated checkpoints), noted on the exception.
- ``metrics``: anomalib's AUROC, NaN with the reason on a test set with one class only.
- ``resize``: the pre-processor whose exported graph resizes antialiased, exactly as training does.

This package imports nothing on its own, so ``images`` and ``hub_cache`` stay free of torch.
"""
