#!/usr/bin/env python
"""Which training recipe makes both streams and all three levels carry signal?

    python benchmarks/streams_study.py [--recipes fixed-aux fixed-aux-mined dual] [--seeds 0] [--threads 1]

Each recipe (RECIPES below) is trained on all of Flickr8k train and validated on all of
validation (1,000 images, 5,000 captions), keeping the best epoch; then every part of the kept
model is diagnosed with the same cosine top-50 shortlist (benchmarks/streams_diagnosis.py):
each stream/level alone, each stream alone, and leave-one-out. Runs live in runs/streams/
NAME-sSEED and resume when killed; results go to benchmarks/results/streams.jsonl (diagnoses),
benchmarks/results/streams_runs.jsonl (one record per finished run: its validation RSUM by epoch
and training time) and the "streams_study" section of docs/RESULTS.md (one row per run,
regenerated from the records, so a fresh checkout without runs/ writes the same table). The shipped round-1 model (learned fusion) is diagnosed as the reference row.

The 48 example photos of the demo are never used here: recipes are chosen on validation only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from results_md import git_commit, machine, write_section
from streams_diagnosis import diagnose, load_records, store_record

ROOT = Path(__file__).resolve().parents[1]
RUNS_STORE = ROOT / "benchmarks" / "results" / "streams_runs.jsonl"
BUDGET = ["--epochs", "4", "--lr-update", "3", "--batch-size", "128", "--embed-dim", "256", "--sim-dim", "128"]
FIXED = ["--stream-fusion", "equal", "--level-fusion", "equal"]
# The kept recipe's flags (any preset with TSHSR levels): the default model and the decisive ablation train with it.
ALIGN_NCE = [*FIXED, "--aux-level-weight", "0.5", "--level-cosine", "--alignment-weight", "1.0", "--alignment-chunk",
             "16"]
# Twice the epochs (the learning rate drops after 6 instead of 3): the kept recipe was still climbing at epoch 4.
LONG = ["--epochs", "8", "--lr-update", "6"]
# Half as many epochs again (the rate drops after 4 instead of 3): with the augmented views the v11 models still
# climbed 6-13 RSUM in epoch 3 at the full rate, so the study's budget may stop the heads before they use it.
E6 = ["--epochs", "6", "--lr-update", "4"]
LITE2 = ["--image-backbone", "tf_efficientnet_lite2"]
LITE2_CL = [*LITE2, "--channels-last"]  # ... cached channels-last (about 1.9x faster, the same features to rounding)
# Recipe v6 (the default model's) and the changes the context-level recipes make to it.
SEPARATE = ["--preset", "tshsr", *ALIGN_NCE, "--context-detach", "--context-skip", "--separate-streams"]
WINDOWS = ["--context-pooling", "windows", "--context-units", "9", "4"]
SCORELESS_CONTEXT = ["--level-fusion", "fixed", "--level-weights", "1", "0", "1"]  # feeds the reasoning only
# a score share for the context level in the image-to-text stream only (i2t's weights first), none in text-to-image
I2T_CONTEXT_SHARE = ["--level-fusion", "fixed", "--level-weights", "1", "1", "1", "1", "0", "1"]
UNIT_DROPOUT = ["--unit-dropout", "0.2"]  # feature-level augmentation: a fifth of the regions and words hidden
PATH_DROPOUT = ["--context-path-dropout", "0.5"]  # half the steps run with the context level cut from the reasoning
STAGE = ["--image-context-stage", "3"]  # the image context units read EfficientNet's stride-16 stage
VIEWS = ["--augment-views", "2"]  # each step shows each photo as itself, mirrored or cropped (cached views)
VIEWS4 = ["--augment-views", "4"]  # the mirror and three crops
LAYER3 = ["--text-context-layer", "3"]  # the caption context units read MiniLM's layer-3 states (of 6)
LAYER0 = ["--text-context-layer", "0"]  # ... MiniLM's token embeddings (with positions): no attention over the words
LAYER1 = ["--text-context-layer", "1"]  # ... its layer-1 states: nearly lexical, one attention step over the words
LAYER5 = ["--text-context-layer", "5"]  # ... its layer-5 states: the frozen input of the trained top layer
TEXT_TOP = ["--text-finetune-layers", "1"]  # MiniLM's last layer trains (at 0.1x the rate) on cached layer-5 states
RECIPES: dict[str, tuple[str, list[str]]] = {
    "fixed-aux": ("fixed equal stream and level weights + a hinge on each of the six parts (weight 0.5)",
                  ["--preset", "tshsr", *FIXED, "--aux-level-weight", "0.5"]),
    "fixed-aux-mined": ("fixed-aux + negatives picked by the full model among the cosine's 8 nearest",
                        ["--preset", "tshsr", *FIXED, "--aux-level-weight", "0.5", "--mine-pool", "8"]),
    "fixed-aux-align": ("fixed-aux + SCAN alignment blended into the local and context levels (--level-cosine)",
                        ["--preset", "tshsr", *FIXED, "--aux-level-weight", "0.5", "--level-cosine"]),
    "fixed-aux-align-nce": ("fixed-aux-align + an InfoNCE on every alignment score (groups of 16 captions)",
                            ["--preset", "tshsr", *ALIGN_NCE]),
    "fixed-aux-align-nce-mined": ("fixed-aux-align-nce + negatives picked by the full model among the cosine's 8 nearest",
                                  ["--preset", "tshsr", *ALIGN_NCE, "--mine-pool", "8"]),
    "fixed-aux-align-joint": ("fixed-aux-align-nce + an InfoNCE on the mean of the cosine and all four alignment "
                              "scores (the parts trained as one ranker)",
                              ["--preset", "tshsr", *ALIGN_NCE, "--alignment-joint", "1.0"]),
    "per-part": ("fixed-aux-align-nce with flat's weight on each part: the alignment InfoNCE and the level hinges are "
                 "means over 4 and 6 parts (flat: 2 and 4), so --alignment-weight 2 and --aux-level-weight 0.75",
                 ["--preset", "tshsr", *ALIGN_NCE, "--alignment-weight", "2.0", "--aux-level-weight", "0.75"]),
    "local-nce": ("fixed-aux-align-nce with the alignment InfoNCE on the local level only (--alignment-levels local): "
                  "the context level's alignment no longer pulls on the shared unit vectors",
                  ["--preset", "tshsr", *ALIGN_NCE, "--alignment-levels", "local"]),
    "detach": ("fixed-aux-align-nce with --context-detach: the context level reads the unit vectors without gradient "
               "(it trains its queries and nodes, never the units the local level aligns)",
               ["--preset", "tshsr", *ALIGN_NCE, "--context-detach"]),
    "detach-skip": ("detach + --context-skip: with the units no longer pulled by the context level, does the global "
                    "node also need the local nodes directly (flat's global part alone is still 4-7 RSUM stronger)?",
                    ["--preset", "tshsr", *ALIGN_NCE, "--context-detach", "--context-skip"]),
    "detach-skip-noaux": ("detach-skip without the hinges on each stream and each part alone (--aux-stream-weight 0 "
                          "--aux-level-weight 0): only the sum is ranked, so the parts may specialise instead of each "
                          "becoming a whole ranker (removing one of six redundant rankers costs little)",
                          ["--preset", "tshsr", *ALIGN_NCE, "--context-detach", "--context-skip", "--aux-stream-weight",
                           "0", "--aux-level-weight", "0"]),
    "detach-skip-units": ("detach-skip with fewer context units (--context-units 3 2 instead of 6 and 4): "
                          "fewer, broader groups, each averaged over more units",
                          ["--preset", "tshsr", *ALIGN_NCE, "--context-detach", "--context-skip", "--context-units",
                           "3", "2"]),
    "detach-skip-salience": ("detach-skip + --word-salience: a learned salience per word, so that a region's attention "
                             "(i2t) and a caption's mean alignment (t2i) are no longer spread over 'a', 'the' and 'in' "
                             "as much as over the content words",
                             ["--preset", "tshsr", *ALIGN_NCE, "--context-detach", "--context-skip", "--word-salience"]),
    "detach-skip-complement": ("detach-skip + --alignment-complement 1: an InfoNCE on each stream's alignment score "
                               "plus the other stream's (without gradient), so each stream is pushed where the other "
                               "ranks wrong instead of repeating it (the streams agree at rank correlation 0.94-0.96)",
                               ["--preset", "tshsr", *ALIGN_NCE, "--context-detach", "--context-skip",
                                "--alignment-complement", "1.0"]),
    "detach-skip-lite2": ("detach-skip on a finer grid: EfficientNet-Lite2 at its native 260 px, 9x9 regions instead of "
                          "Lite0's 7x7 (and a stronger backbone: ImageNet top-1 77.6 against 75.1)",
                          ["--preset", "tshsr", *ALIGN_NCE, "--context-detach", "--context-skip", *LITE2]),
    "dual-lite2": ("dual encoder on EfficientNet-Lite2 (the baseline of detach-skip-lite2: the dual encoder gains "
                   "from the stronger backbone too)", ["--preset", "dual", *LITE2]),
    "detach-skip-separate": ("detach-skip + --separate-streams: each stream has its own towers (projections, pooling, "
                             "contrastive embedding), so the streams stop reading the same unit vectors (two "
                             "dual-lite2 seeds averaged gain +12 RSUM, the detach-skip-lite2 streams together +0.6)",
                             SEPARATE),
    "detach-skip-separate-windows": ("detach-skip-separate + --context-pooling windows --context-units 9 4: each "
                                     "context unit a fixed window (4 overlapping phrase windows along the caption, 3x3 "
                                     "neighbourhoods on the 7x7 grid) instead of a learned soft group, whose "
                                     "membership had spread over 10-15 of a caption's 15-17 tokens (so the context "
                                     "level was a second, weaker global level)",
                                     [*SEPARATE, *WINDOWS]),
    "detach-skip-separate-windows-perpart": ("detach-skip-separate-windows with flat's loss weight on each part "
                                             "(--alignment-weight 2 --aux-level-weight 0.75): the alignment InfoNCE "
                                             "and the level hinges are means over 4 and 6 parts in tshsr, 2 and 4 in "
                                             "flat, so tshsr's local and global parts learn at 1/2 and 2/3 of flat's "
                                             "weight; with the context level detached this no longer feeds it into "
                                             "the shared units",
                                             [*SEPARATE, *WINDOWS, "--alignment-weight", "2.0",
                                              "--aux-level-weight", "0.75"]),
    "detach-skip-separate-ctx0": ("detach-skip-separate + --level-fusion fixed --level-weights 1 0 1: the context "
                                  "level feeds the reasoning (the global node gathers its nodes) but adds nothing to "
                                  "the score by itself, whose level weights are then flat's (local and global 1/2 "
                                  "each); removing the context score gained 1.5-3.1 RSUM on every seed",
                                  [*SEPARATE, *SCORELESS_CONTEXT]),
    "detach-skip-separate-windows-ctx0": ("detach-skip-separate-windows + --level-fusion fixed --level-weights 1 0 1: "
                                          "window context units that feed the reasoning only (as a score, removing "
                                          "the windows' context level still gained 0.8-1.0 RSUM)",
                                          [*SEPARATE, *WINDOWS, *SCORELESS_CONTEXT]),
    "detach-skip-separate-windows-ctx0-udrop": ("detach-skip-separate-windows-ctx0 + --unit-dropout 0.2: each step "
                                                "hides a fifth of the regions and words (feature-level augmentation "
                                                "of the cached features); tshsr has more head than flat, longer "
                                                "training overfits, so regularising may pay it more than flat",
                                                [*SEPARATE, *WINDOWS, *SCORELESS_CONTEXT, *UNIT_DROPOUT]),
    "detach-skip-separate-windows-ctx0-pathdrop": ("detach-skip-separate-windows-ctx0 + --context-path-dropout 0.5: "
                                                   "half the steps run with the context level cut out of the "
                                                   "reasoning graph. Cutting it from the trained default model at "
                                                   "evaluation gained 3.7 RSUM (top-50, seed 0): the global node "
                                                   "reads the context level and is worse for it; trained to work "
                                                   "with and without it, it may only take what helps",
                                                   [*SEPARATE, *WINDOWS, *SCORELESS_CONTEXT, *PATH_DROPOUT]),
    "detach-skip-separate-windows-ctx0-text1": ("detach-skip-separate-windows-ctx0 + --text-finetune-layers 1: the "
                                                "last of MiniLM's 6 layers trains (at 0.1x the head's rate) on cached "
                                                "states of the 5 below, so the word units adapt to the images instead "
                                                "of staying sentence-embedding features",
                                                [*SEPARATE, *WINDOWS, *SCORELESS_CONTEXT, *TEXT_TOP]),
    "detach-skip-separate-windows-ctx0-pathdrop-text1": ("the two levers together: the context path dropped in half "
                                                         "the steps, and MiniLM's last layer trained",
                                                         [*SEPARATE, *WINDOWS, *SCORELESS_CONTEXT, *PATH_DROPOUT,
                                                          *TEXT_TOP]),
    "detach-skip-separate-windows-ctx0-gain-text1": ("v8 + --context-gain-weight 0.5: a hinge on what the context "
                                                     "path adds to each mined pair's score (full minus the score "
                                                     "with the context level cut from the reasoning), so that its "
                                                     "contribution ranks by itself. Cutting the path from v8 gains "
                                                     "RSUM on validation and on training images (+1.2 already in a "
                                                     "cosine top-3 on 1,000 training images)",
                                                     [*SEPARATE, *WINDOWS, *SCORELESS_CONTEXT, "--context-gain-weight",
                                                      "0.5", *TEXT_TOP]),
    "detach-skip-separate-windows-ctx0-gate-text1": ("v8 + --context-gate: the context level's messages scaled by a "
                                                     "learned gate per stream that starts at zero (ReZero), so the "
                                                     "reasoning starts as the graph without the context level and "
                                                     "opens the path only as far as training finds it useful",
                                                     [*SEPARATE, *WINDOWS, *SCORELESS_CONTEXT, "--context-gate",
                                                      *TEXT_TOP]),
    "detach-skip-separate-windows-ctx0-rel-text1": ("v8 + --context-relations: the context nodes reason over each "
                                                    "other (SGR's relation step) in every reasoning step, so the "
                                                    "context level can carry relations between phrases and "
                                                    "neighbourhoods that the window means and the local nodes "
                                                    "cannot (the gate showed the means add nothing)",
                                                    [*SEPARATE, *WINDOWS, *SCORELESS_CONTEXT, "--context-relations",
                                                     *TEXT_TOP]),
    "detach-skip-separate-windows-ctx0-stage3-text1": ("v8 + --image-context-stage 3: the image context units pool "
                                                       "EfficientNet's stride-16 stage (112 channels, pooled onto "
                                                       "the 7x7 grid, projected on their own) instead of the local "
                                                       "level's region vectors, so the context level reads features "
                                                       "the local level does not have (seed 0 trained with the "
                                                       "projection built before the t2i towers and the head: "
                                                       "their initial weights were not v8's at the same seed)",
                                                       [*SEPARATE, *WINDOWS, *SCORELESS_CONTEXT, *STAGE, *TEXT_TOP]),
    "detach-skip-separate-windows-ctx0-stage3-paired-text1": ("the stage-3 recipe again, with the projection built "
                                                              "after every other layer: the towers and the head start "
                                                              "from v8's weights at the same seed, so a run is paired "
                                                              "with v8's and flat's",
                                                              [*SEPARATE, *WINDOWS, *SCORELESS_CONTEXT, *STAGE,
                                                               *TEXT_TOP]),
    "detach-skip-separate-windows-stage3-text1": ("the stage-3 context units with a score share of their own "
                                                  "(level weights equal, as before v7): with features of its own "
                                                  "the context level's alignment may rank differently from the "
                                                  "local level's instead of diluting it (seed 0 not paired with "
                                                  "v8's initial weights, as the first stage-3 recipe)",
                                                  [*SEPARATE, *WINDOWS, *STAGE, *TEXT_TOP]),
    "detach-skip-separate-windows-ctx0-views4-text1": ("v9 with --augment-views 4 (the mirror and three crops): two "
                                                       "views lifted tshsr on every seed, so more of them may lift "
                                                       "it further", [*SEPARATE, *WINDOWS, *SCORELESS_CONTEXT,
                                                                      *VIEWS4, *TEXT_TOP]),
    "detach-skip-separate-windows-ctx0-layer3-views2-text1": ("v9 + --text-context-layer 3: the caption context "
                                                              "units pool MiniLM's layer-3 states (the middle of its "
                                                              "6, frozen, projected on their own) instead of the "
                                                              "local level's word vectors, so the context level "
                                                              "reads features the local level does not have (the "
                                                              "text side of the stage-3 lever)",
                                                              [*SEPARATE, *WINDOWS, *SCORELESS_CONTEXT, *LAYER3,
                                                               *VIEWS, *TEXT_TOP]),
    "detach-skip-separate-windows-ctx0-layer1-views2-text1": ("the layer-3 recipe with MiniLM's layer 1: phrase "
                                                              "windows over nearly lexical states, the far end of "
                                                              "what the local level's trained word vectors carry",
                                                              [*SEPARATE, *WINDOWS, *SCORELESS_CONTEXT, *LAYER1,
                                                               *VIEWS, *TEXT_TOP]),
    "detach-skip-separate-windows-ctx0-layer0-views2-text1": ("the layer-3 recipe with MiniLM's token embeddings: "
                                                              "phrase windows over context-free word vectors, one "
                                                              "step past layer 1 (the lowest layer had the smallest "
                                                              "gain from the context path's cut on seed 0)",
                                                              [*SEPARATE, *WINDOWS, *SCORELESS_CONTEXT, *LAYER0,
                                                               *VIEWS, *TEXT_TOP]),
    "detach-separate-windows-ctx0-layer0-views2-text1": ("the layer-0 recipe without --context-skip: the context "
                                                         "level is again the only path between the local and "
                                                         "global nodes, the hierarchy as TSHSR draws it. With "
                                                         "layer-0 phrase windows the path no longer gets in the "
                                                         "global node's way, so the global node may do as well "
                                                         "reading local evidence through it alone",
                                                         [*[f for f in SEPARATE if f != "--context-skip"], *WINDOWS,
                                                          *SCORELESS_CONTEXT, *LAYER0, *VIEWS, *TEXT_TOP]),
    "detach-skip-separate-windows-layer1-views2-text1": ("the layer-1 recipe with a score share for the context "
                                                         "level (equal level weights): layer 1 is the first layer "
                                                         "whose context path the global node uses, so its own "
                                                         "score may count too",
                                                         [*SEPARATE, *WINDOWS, *LAYER1, *VIEWS, *TEXT_TOP]),
    "detach-skip-separate-windows-ctx0-layer5-views2-text1": ("the layer-3 recipe with MiniLM's layer 5, the frozen "
                                                              "input of its trained top layer: the near end, so the "
                                                              "sweep tells whether the layer matters at all",
                                                              [*SEPARATE, *WINDOWS, *SCORELESS_CONTEXT, *LAYER5,
                                                               *VIEWS, *TEXT_TOP]),
    "detach-skip-separate-windows-layer3-views2-text1": ("the layer-3 recipe with a score share for the context "
                                                         "level (equal level weights): whether lower-layer phrase "
                                                         "features make the context level's own score count",
                                                         [*SEPARATE, *WINDOWS, *LAYER3, *VIEWS, *TEXT_TOP]),
    "dual-views4-text1": ("dual encoder + --augment-views 4 + --text-finetune-layers 1: the baseline of the views4 "
                          "recipe (two views lifted the dual encoder more than tshsr)",
                          ["--preset", "dual", *VIEWS4, *TEXT_TOP]),
    "detach-skip-separate-windows-ctx0-views2-text1": ("v8 + --augment-views 2: every step shows each training "
                                                       "photo as itself, mirrored (never when a caption says left "
                                                       "or right) or as a fixed crop of 50-100 % of its area, "
                                                       "each a cached pass of the frozen backbone: real data "
                                                       "augmentation, where --unit-dropout only hid cached units. "
                                                       "tshsr's head is larger than flat's, so it may gain more",
                                                       [*SEPARATE, *WINDOWS, *SCORELESS_CONTEXT, *VIEWS, *TEXT_TOP]),
    "detach-skip-separate-windows-ctx0-layer0-views2-text1-e6": ("v11 trained 6 epochs, the rate dropped after 4: "
                                                                 "does the context level teach the other levels "
                                                                 "anything once the budget binds less? (against "
                                                                 "flat-separate-views2-text1-e6, one machine)",
                                                                 [*SEPARATE, *WINDOWS, *SCORELESS_CONTEXT, *LAYER0,
                                                                  *VIEWS, *TEXT_TOP, *E6]),
    "detach-skip-separate-windows-i2tctx-layer0-views2-text1": ("v11 with a score share for the context level in "
                                                                "the image-to-text stream only (local, context, "
                                                                "global 1/3 each there; text-to-image unchanged): "
                                                                "the i2t context score is v11's best single part "
                                                                "(290.2, i2t/local 287.5) and the t2i one its "
                                                                "weakest, and a share chosen after training did "
                                                                "not help (cross-fitted -1.3 to +0.6): does one "
                                                                "the model trains with count? (against v11, one "
                                                                "machine)",
                                                                [*SEPARATE, *WINDOWS, *I2T_CONTEXT_SHARE, *LAYER0,
                                                                 *VIEWS, *TEXT_TOP]),
    "detach-skip-separate-windows-ctx0-layer0-views2-text1-lite2": ("v11 on EfficientNet-Lite2 at its native 260 "
                                                                    "px: a 9x9 grid of regions under the same 3x3 "
                                                                    "Gaussian context windows, from a stronger "
                                                                    "backbone (the last "
                                                                    "lever the context-level study left: a finer "
                                                                    "grid; against dual- and flat-...-lite2, one "
                                                                    "machine)",
                                                                    [*SEPARATE, *WINDOWS, *SCORELESS_CONTEXT, *LAYER0,
                                                                     *VIEWS, *TEXT_TOP, *LITE2_CL]),
    "detach-skip-separate-windows-ctx0-layer0-views2-text1-rmean": ("v11 with --readout-mean: each level read out "
                                                                    "before and after the reasoning, the two scores "
                                                                    "averaged, in training too (session 33: that "
                                                                    "mean, taken after training, ranked 1.2-2.1 "
                                                                    "above the full score of three v11 models; "
                                                                    "against v11, one machine)",
                                                                    [*SEPARATE, *WINDOWS, *SCORELESS_CONTEXT, *LAYER0,
                                                                     *VIEWS, *TEXT_TOP, "--readout-mean"]),
    "flat-separate-views2-text1-lite2": ("flat-separate-views2-text1 on EfficientNet-Lite2: the control of v11-lite2",
                                         ["--preset", "flat", *ALIGN_NCE, "--separate-streams", *VIEWS, *TEXT_TOP,
                                          *LITE2_CL]),
    "dual-views2-text1-lite2": ("dual-views2-text1 on EfficientNet-Lite2: the baseline of v11-lite2",
                                ["--preset", "dual", *VIEWS, *TEXT_TOP, *LITE2_CL]),
    "flat-separate-views2-text1-e6": ("flat-separate-views2-text1 trained 6 epochs, the rate dropped after 4: the "
                                      "control of the 6-epoch v11",
                                      ["--preset", "flat", *ALIGN_NCE, "--separate-streams", *VIEWS, *TEXT_TOP, *E6]),
    "dual-views2-text1-e6": ("dual-views2-text1 trained 6 epochs, the rate dropped after 4: the 6-epoch baseline",
                             ["--preset", "dual", *VIEWS, *TEXT_TOP, *E6]),
    "flat-separate-views2-text1": ("flat with two towers + --augment-views 2 + --text-finetune-layers 1: the "
                                   "comparison for detach-skip-separate-windows-ctx0-views2-text1",
                                   ["--preset", "flat", *ALIGN_NCE, "--separate-streams", *VIEWS, *TEXT_TOP]),
    "dual-views2-text1": ("dual encoder + --augment-views 2 + --text-finetune-layers 1: the baseline of the views2 "
                          "recipes (the dual encoder sees the same mirrored and cropped photos)",
                          ["--preset", "dual", *VIEWS, *TEXT_TOP]),
    "dual-separate-views2-text1": ("two dual encoders trained together + --augment-views 2 + "
                                   "--text-finetune-layers 1: the control of the views2 recipes with as many towers "
                                   "as tshsr (a 3-seed ensemble of dual-views2-text1 reaches 305.5)",
                                   ["--preset", "dual", "--separate-streams", *VIEWS, *TEXT_TOP]),
    "flat-separate-text1": ("flat with two towers + --text-finetune-layers 1: the comparison for "
                            "detach-skip-separate-windows-ctx0-text1",
                            ["--preset", "flat", *ALIGN_NCE, "--separate-streams", *TEXT_TOP]),
    "dual-text1": ("dual encoder + --text-finetune-layers 1 (the baseline of the -text1 recipes: the dual encoder "
                   "gains from a trained text layer too)", ["--preset", "dual", *TEXT_TOP]),
    "flat-separate-udrop": ("flat with two towers (the decisive ablation's flat, --preset flat --separate-streams) "
                            "+ --unit-dropout 0.2: the comparison for detach-skip-separate-windows-ctx0-udrop",
                            ["--preset", "flat", *ALIGN_NCE, "--separate-streams", *UNIT_DROPOUT]),
    "dual-separate": ("two dual encoders trained together, their cosines averaged (--preset dual --separate-streams): "
                      "how much of detach-skip-separate's gain two towers alone give",
                      ["--preset", "dual", "--separate-streams"]),
    "skip": ("fixed-aux-align-nce with --context-skip: the reasoning also links local and global directly, so the "
             "context level is a path beside local -> global instead of a bottleneck between them",
             ["--preset", "tshsr", *ALIGN_NCE, "--context-skip"]),
    "long": ("fixed-aux-align-nce trained 8 epochs, learning rate dropped after 6 (the kept recipe still climbed at 4)",
             ["--preset", "tshsr", *ALIGN_NCE, *LONG]),
    "flat-long": ("the flat preset (no context level) with the long recipe",
                  ["--preset", "flat", *ALIGN_NCE, *LONG]),
    "dual-long": ("dual encoder trained 8 epochs (the baseline of the long recipe)", ["--preset", "dual", *LONG]),
    "learned-aux": ("round-1 learned weights (x50 rate) + the per-part hinge (is fixing the weights needed?)",
                    ["--preset", "tshsr", "--aux-level-weight", "0.5"]),
    "dual": ("dual encoder at the same budget (the baseline the full model must beat by 20 RSUM)",
             ["--preset", "dual"]),
}
REFERENCE = ("shipped-v2", "round-1 default: learned softmax weights at x50 rate, 6 epochs (best: 3)")
PROTOCOL_K = 50


def train(name: str, seed: int, data_dir: str, threads: int | None,
          out: Path | None = None) -> tuple[Path, float | None]:
    """Train recipe ``name`` with ``seed`` into ``out`` (default runs/streams/NAME-sSEED), resuming a killed run;
    a finished run (train_args.json is written last) is not trained again."""
    out = out or ROOT / "runs" / "streams" / f"{name}-s{seed}"
    if (out / "train_args.json").exists():
        return out, _wall_seconds(out)
    cmd = train_command(name, seed, data_dir, threads, out)
    if (out / "checkpoint").exists():
        cmd.append("--resume")
    subprocess.run(cmd, cwd=ROOT, check=True)
    return out, _wall_seconds(out)


def flag_value(flags: list[str], name: str) -> str | None:
    """The value ``flags`` give option ``name`` (None when they do not set it)."""
    return flags[flags.index(name) + 1] if name in flags else None


def budget_of(name: str) -> list[str]:
    """The study's budget as recipe ``name`` trains it: BUDGET with the recipe's own values of the same flags
    (e.g. the -e6 and long recipes' --epochs and --lr-update), which come later on the command line and win."""
    flags, budget = RECIPES[name][1], list(BUDGET)
    for i in range(0, len(budget), 2):
        budget[i + 1] = flag_value(flags, budget[i]) or budget[i + 1]
    return budget


def epochs_of(name: str) -> int:
    """The epochs recipe ``name`` trains for (its own, else the study's)."""
    return int(flag_value(budget_of(name), "--epochs"))


def train_command(name: str, seed: int, data_dir: str, threads: int | None, out: Path) -> list[str]:
    """The train.py command line of recipe ``name`` at the study's budget."""
    cmd = [sys.executable, "train.py", "--dataset", "flickr8k", "--data-dir", data_dir, "--split-val", "validation",
           "--output-dir", str(out), "--seed", str(seed), "--no-progress", *BUDGET, *RECIPES[name][1]]
    return cmd + (["--threads", str(threads)] if threads else [])


def _wall_seconds(out: Path) -> float | None:
    """Training wall time from the run's log (first to last record), resumes included."""
    times = [json.loads(x)["time"] for x in (out / "log.jsonl").read_text().splitlines() if '"time"' in x]
    return round(times[-1] - times[0]) if len(times) > 1 else None


def validation_by_epoch(out: Path) -> dict[int, float]:
    """{epoch: validation RSUM} from a run's log.jsonl, in epoch order; an epoch validated again
    after a resume keeps its last value."""
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if '"validation"' in x]
    return dict(sorted({r["epoch"]: r["validation"]["rsum"] for r in rows if r.get("validation")}.items()))


def _history(out: Path) -> list[float]:
    return list(validation_by_epoch(out).values())


def run_record(name: str, out: Path, threads: int | None) -> dict:
    """The record of a finished run: what the study table shows of it once runs/ is gone."""
    recipe_name = name.rsplit("-s", 1)[0]
    return {"name": name, "protocol": "training", "recipe": recipe_name, "flags": " ".join(RECIPES[recipe_name][1]),
            "budget": " ".join(budget_of(recipe_name)), "history": _history(out), "seconds": _wall_seconds(out),
            "threads": threads, "commit": git_commit(), "machine": machine()}


def all_runs() -> list[dict]:
    """Every study run, in RECIPES order then by seed: the recorded ones (streams_runs.jsonl) and,
    where no record exists yet, the ones still training under runs/streams (epochs so far)."""
    recorded = {r["name"]: r for r in load_records(RUNS_STORE)}
    found = []
    for name, (recipe, _) in RECIPES.items():
        names = {n for n in recorded if n.rsplit("-s", 1)[0] == name}
        for out in (ROOT / "runs" / "streams").glob(f"{name}-s*"):
            if out.name.removeprefix(f"{name}-s").isdigit() and (out / "log.jsonl").exists():
                names.add(out.name)
        for run_name in sorted(names, key=lambda n: int(n.rsplit("-s", 1)[1])):
            rec = recorded.get(run_name)
            if rec is None:
                out = ROOT / "runs" / "streams" / run_name
                rec = {"history": _history(out), "seconds": None}
            found.append({"name": run_name, "recipe": recipe, "history": rec["history"], "seconds": rec["seconds"],
                          "stopped": rec.get("stopped", False)})
    return found


def summarize(records: list[dict], runs: list[dict]) -> str:
    diag = {(r["name"]): r for r in records if r["protocol"] == f"rerank-{PROTOCOL_K}"}
    lines = ["## Streams study: recipes tried to make every stream and level count", "",
             "Written by `python benchmarks/streams_study.py`. Flickr8k, all 6,000 training images, validation "
             "1,000 images / 5,000 captions, seed 0 unless noted. `val RSUM` is the kept epoch's RSUM under the "
             f"trainer's protocol (cosine top-20 reranked); the other columns use the cosine top-{PROTOCOL_K} "
             "shortlist for every ranker (see the streams section): the full model, its cosine alone, the "
             "weakest and strongest part alone, and what removing each stream or the context level costs "
             "in RSUM (positive = the full model is better with the part); `−ctx path` cuts the context level out "
             "of each stream's reasoning instead (the knock-out: what the other levels' use of it is worth). Runs "
             "still training show the epochs so far.", "",
             "| run | recipe | val RSUM by epoch | full | cosine | parts alone (min–max) | −i2t | −t2i | −context | "
             "−ctx path | train s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        rec = diag.get(run["name"])
        history = ", ".join(f"{v:.1f}" for v in run.get("history", [])) or "—"
        if rec is None:
            note = ("no parts (cosine only)" if run["name"].startswith("dual")
                    else "stopped early, not diagnosed" if run.get("stopped") else "not diagnosed yet")
            lines.append(f"| {run['name']} | {run['recipe']} | {history} | {note} | | | | | | | {run.get('seconds') or '—'} |")
            continue
        m = rec["metrics"]
        full = m["full"]["rsum"]
        parts = [v["rsum"] for k, v in m.items() if "/" in k and not k.endswith(" alignment")]
        span = f"{min(parts):.1f}–{max(parts):.1f}" if parts else "—"

        def cost(key: str) -> str:
            return f"{full - m[key]['rsum']:+.1f}" if key in m else "—"

        lines.append(f"| {run['name']} | {run['recipe']} | {history} | {full:.1f} | {m['cosine']['rsum']:.1f} | {span} | "
                     f"{cost('without i2t')} | {cost('without t2i')} | {cost('without context')} | "
                     f"{cost('without context in reasoning')} | {run.get('seconds') or '—'} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache-dir", default=str(ROOT / "cache" / "features"))
    p.add_argument("--summary-only", action="store_true")
    p.add_argument("--no-diagnosis", action="store_true",
                   help="record the run only; its top-50 diagnosis can follow with streams_diagnosis.py")
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    name, recipe = REFERENCE
    runs = [{"name": name, "recipe": recipe, "history": [245.2, 274.4, 278.2, 273.6, 269.2, 271.1], "seconds": 4134}]
    # The round-1 model is no longer in checkpoints/ (v3 replaced it); its diagnosis stays as recorded
    # in streams.jsonl, and is never recomputed from a folder that now holds another model.
    records = load_records()
    for recipe_name in args.recipes:
        for seed in args.seeds:
            run_name = f"{recipe_name}-s{seed}"
            if args.summary_only:
                continue
            out, _ = train(recipe_name, seed, args.data_dir, args.threads)
            store_record(run_record(run_name, out, args.threads), RUNS_STORE)
            diagnosed = any(r["name"] == run_name and r["protocol"] == f"rerank-{PROTOCOL_K}" for r in records)
            if not (args.no_diagnosis or recipe_name.startswith("dual") or diagnosed):
                # Stored after the diagnosis (minutes), re-reading the file: another study process may have
                # stored its own record meanwhile.
                records = store_record(diagnose(run_name, out, args.data_dir, PROTOCOL_K, args.cache_dir))
            write_section("streams_study", summarize(load_records(), runs + all_runs()))
    write_section("streams_study", summarize(load_records(), runs + all_runs()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
