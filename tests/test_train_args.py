"""The trainer's command line (tshsr_train.args): every flag fills a TrainArgs field, and the
flags of runs started before the trainer moved still parse to the same settings."""

from __future__ import annotations

import dataclasses

from tshsr_train import TrainArgs, build_parser, parse_args


def test_every_flag_is_a_train_args_field() -> None:
    fields = {f.name for f in dataclasses.fields(TrainArgs)}
    dests = {a.dest for a in build_parser()._actions if a.dest != "help"}
    assert dests <= fields, sorted(dests - fields)
    no_flag = {"extra", "given"}  # set in code or train_args.json, not on the command line
    assert fields - dests <= no_flag, sorted(fields - dests - no_flag)


def test_flags_parse_to_the_settings_and_loss_levers() -> None:
    args = parse_args(["--dataset", "flickr8k", "--data-dir", "d", "--split-val", "", "--val-rerank-k", "0",
                       "--stream-fusion", "equal", "--level-fusion", "equal", "--aux-level-weight", "0.3",
                       "--mine-pool", "7", "--hard-negatives", "2", "--no-progress", "--resume"])
    assert args.dataset == "imagefolder" and args.val_split is None and args.val_rerank_k is None
    assert (args.stream_fusion, args.level_fusion, args.progress, args.resume) == ("equal", "equal", False, True)
    loss = args.loss_settings()
    assert (loss.aux_level_weight, loss.mine_pool, loss.hard_negatives) == (0.3, 7, 2)
    assert parse_args([]) == TrainArgs()  # the defaults of the flags are the dataclass's


def test_given_holds_only_the_flags_on_the_command_line() -> None:
    """--resume compares only these with the checkpoint: a default is never a change."""
    args = parse_args(["--embed-dim", "256", "--finetune-image", "--no-progress", "--streaming",
                       "--num-workers", "2", "--dist-timeout-min", "90"])
    assert set(args.given) == {"embed_dim", "finetune_image", "progress", "streaming", "num_workers",
                               "dist_timeout_min"}
    assert (args.streaming, args.num_workers, args.dist_timeout_min) == (True, 2, 90.0)
    assert parse_args([]).given == []
    # Built in code (no command line): the fields off their defaults count as given.
    assert TrainArgs(embed_dim=64, preset="dual").given_fields() == {"embed_dim", "preset"}


def test_recipe_flags_replay_the_recipe_of_a_run() -> None:
    """The model card's recipe line: the loss and fusion flags off their defaults, which parse back
    to the same settings; data, budget and machine flags are not part of it."""
    argv = ["--stream-fusion", "equal", "--aux-level-weight", "0.5", "--level-cosine", "--context-detach",
            "--alignment-weight", "1.0", "--epochs", "4", "--threads", "1", "--data-dir", "d"]
    args = parse_args(argv)
    flags = args.recipe_flags()
    assert flags == ["--aux-level-weight", "0.5", "--stream-fusion", "equal", "--level-cosine",
                     "--alignment-weight", "1.0", "--context-detach"]
    replayed = parse_args(flags)
    assert all(getattr(replayed, f.name) == getattr(args, f.name) for f in dataclasses.fields(TrainArgs)
               if f.name not in ("epochs", "threads", "data_dir", "given"))
    assert TrainArgs().recipe_flags() == []
    assert parse_args(["--context-units", "3", "2"]).recipe_flags() == ["--context-units", "3", "2"]


def test_resume_check_compares_fields_not_flags(tmp_path) -> None:
    """The checkpoint's config against the one the given flags would build, field by field: a
    value equal to the checkpoint's passes, fields filled in from a backbone are not compared."""
    import json

    import pytest

    from tshsr import TSHSRConfig
    from tshsr_train.model_config import resumed_config

    stored = TSHSRConfig.preset("flat", embed_dim=128, image_feature_dim=1280, image_size=224)
    (tmp_path / "config.json").write_text(json.dumps(stored.to_dict()))
    same = resumed_config(parse_args(["--preset", "flat", "--embed-dim", "128", "--image-feature-dim", "7"]),
                          tmp_path, None)
    assert same == stored  # image_feature_dim comes from the backbone here: the flag is not compared
    with pytest.raises(ValueError, match=r"text_encoder \(checkpoint 'transformers', --text-encoder gives 'bigru'\)"):
        resumed_config(parse_args(["--text-encoder", "bigru"]), tmp_path, None)
    with pytest.raises(ValueError, match=r"levels \(checkpoint \('local', 'global'\), --preset gives") as err:
        resumed_config(parse_args(["--preset", "tshsr", "--embed-dim", "128"]), tmp_path, None)
    assert "embed_dim" not in str(err.value) and "--preset gives" in str(err.value)
