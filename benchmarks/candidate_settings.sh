# The training settings that candidates.sh and protocol.sh measure (benchmarks/sweep.py --setting items).
# Baselines: a PatchCore-equivalent bank (scored as PatchCore scores an image), the untrained f and the defaults.
BASELINES=(--setting num_steps=0,coreset=projected,image_score=patches --setting num_steps=0 --setting defaults)
# Candidates: the former sigma (1, in units of the batch's k-th-neighbour scale), nearest-neighbour batches,
# wider kernels on unit-length targets (the default is 0.1), a low learning rate, the image scored as
# PatchCore scores it (the default scores its map's largest pixel).
CANDIDATES=(--setting sigma_unit=knn --setting batch_sampling=neighbors --setting sigma_unit=normalized,sigma=1
  --setting sigma_unit=normalized,sigma=0.5 --setting learning_rate=1e-5 --setting image_score=patches)
# Recipe: the paper reimplementations' AdamP, alone and with learning rate 1e-5 for 4,000 steps (their
# 120 epochs over all patches would take hours per run on 2 cores).
RECIPE=(--setting optimizer=adamp --setting optimizer=adamp,learning_rate=1e-5,num_steps=4000)
# Length: the same distance for f at other rates. AdamP's steps have a nearly fixed size, so the learning rate
# times the passes over the training patches says how far f moves; the defaults make 2.4 passes at 4e-5.
LENGTH=(--setting learning_rate=1e-5,passes=9.6 --setting learning_rate=1e-4,passes=0.96)
