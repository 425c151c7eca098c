"""Run one arvid stage with a tiny CPU config, as a subprocess the kill tests can SIGKILL.

    python tests/_reliability_runner.py STAGE WORK OUT

``STAGE``: tok (train-tokenizer, proxy), curate, tokenize, gen (train-generator), sample.
``WORK``: a folder with the inputs of the later stages (``WORK/tok/tokenizer`` for curate and
tokenize, ``WORK/tokens`` for gen, ``WORK/gen/gpt`` for sample); ``OUT``: the stage's output dir.
The configs are fixed here so that the reference run and every killed/resumed run are the same run.
Run lengths (12 tokenizer steps, 24 generator steps, 12 curation shards, a checkpoint every step)
are what the kill plan of ``test_reliability_kill.py`` needs to leave work after each sure point.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The layout of the adaptive tests: 4 blocks of 2 frames, candidates (1, 4, 16): 81 assignments.
TOK_PARAMS = dict(frames_per_block=[2, 2, 2, 2], candidates=[1, 4, 16], image_size=16)


def data_cfg(num_videos: int = 12, num_val: int = 4):
    """Synthetic 8x16x16 clips with fixed clip starts."""
    from arvid.data.datasets import DataConfig

    return DataConfig(source="synthetic", frames=8, size=16, num_videos=num_videos, num_val_videos=num_val,
                      random_start=False)


def trainer_cfg(max_steps: int, **kw):
    """A CPU fp32 Trainer that checkpoints every step (each step is a kill point worth resuming from)."""
    from arvid.training import TrainerConfig

    base = dict(max_steps=max_steps, batch_size=4, lr=1e-3, precision="fp32", device="cpu", checkpoint_every=1,
                keep_last=2, log_every=1, progress=False, seed=0, warmup_steps=0, schedule="constant")
    base.update(kw)
    return TrainerConfig(**base)


def build(stage: str, work: Path, out: Path):
    """The config object and run function of ``stage``."""
    if stage == "tok":
        from arvid.stages.train_tokenizer import TokenizerSpec, TrainTokenizerConfig, run

        cfg = TrainTokenizerConfig(data=data_cfg(), tokenizer=TokenizerSpec("evatok", "debug", dict(TOK_PARAMS)),
                                   trainer=trainer_cfg(12, ema_decay=0.9), stage="proxy", val_videos=2,
                                   val_random_assignments=1, out_dir=str(out))
        return cfg, run
    if stage == "curate":
        from arvid.stages.curate import CurateConfig, run

        cfg = CurateConfig(data=data_cfg(), split="train", tokenizer=str(work / "tok" / "tokenizer"),
                           quality="mse", mode="brute", calib_videos=4, calib_assignments=4, batch_size=81,
                           videos_per_step=2, save_every=1, device="cpu", out_dir=str(out))
        return cfg, run
    if stage == "tokenize":
        from arvid.stages.tokenize import TokenizeConfig, run

        cfg = TokenizeConfig(data=data_cfg(), split="train", tokenizer=str(work / "tok" / "tokenizer"),
                             assignments=str(work / "labels.npy"), batch_size=2, save_every=2, device="cpu",
                             out_dir=str(out))
        return cfg, run
    if stage == "gen":
        from arvid.stages.train_generator import TrainGeneratorConfig, run

        cfg = TrainGeneratorConfig(token_store=str(work / "tokens"), tokenizer=str(work / "tok" / "tokenizer"),
                                   preset="debug", gpt=dict(attn_backend="sdpa"), max_tokens=200,
                                   trainer=trainer_cfg(24, batch_size=1), out_dir=str(out))
        return cfg, run
    if stage == "sample":
        from arvid.sampling.sampler import SamplerConfig
        from arvid.stages.sample import SampleConfig, run

        cfg = SampleConfig(generator=str(work / "gen" / "gpt"), tokenizer=str(work / "tok" / "tokenizer"),
                           out=str(out), classes=[0, 1], per_class=3, batch_size=2, device="cpu",
                           save_videos=True, grid_format="gif", sampler=SamplerConfig(), seed=0)
        return cfg, run
    raise SystemExit(f"unknown stage {stage!r}")


def main(argv: list[str]) -> int:
    stage, work, out = argv[0], Path(argv[1]), Path(argv[2])
    import torch

    torch.set_num_threads(1)  # two of these may run beside pytest on a 2-core machine
    cfg, run = build(stage, work, out)
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
