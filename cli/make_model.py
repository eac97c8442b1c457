"""`dsv4 make-model`: write a random-weight checkpoint in the official layout."""
from __future__ import annotations

import sys

import click


@click.command("make-model")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--preset", required=True, type=click.Choice(["tiny", "small", "flash", "pro"]),
              help="Model shape: tiny/small for tests and demos; flash/pro with the official "
                   "dimensions.")
@click.option("--layers", type=click.IntRange(min=1), default=None,
              help="Main layers (keeps the official layer schedule's prefix).")
@click.option("--experts", type=click.IntRange(min=1), default=None,
              help="Routed experts per layer.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--shard-size", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Largest shard, in MiB.")
def make_model(folder, preset, layers, experts, seed, shard_size):
    """Write a random-weight checkpoint into FOLDER (new or empty): FP8 linears, MXFP4
    experts, shards + index, config.json, generation_config.json and a tokenizer (the
    official one for real-vocabulary presets, a toy BPE for tiny). The shards are then
    dropped from the page cache, so that the first load maps them on 2 MB pages."""
    from dsv4.runtime.random_checkpoint import make_random_checkpoint  # noqa: PLC0415
    from dsv4.runtime.pages import evict  # noqa: PLC0415
    from dsv4.runtime.weights import Checkpoint  # noqa: PLC0415

    cfg = make_random_checkpoint(folder, preset, layers=layers, experts=experts, seed=seed,
                                 shard_bytes=shard_size << 20, progress=sys.stderr.isatty())
    ckpt = Checkpoint(folder)
    size = ckpt.total_bytes()
    # Written pages sit in the page cache in small folios and would be mapped on 4 KB pages;
    # dropped now, the first load reads them back on 2 MB pages (runtime/pages.py).
    evict(ckpt.files())
    click.echo(f"wrote {folder}: preset {preset}, {cfg.n_layers} layers, "
               f"{cfg.n_routed_experts} experts, {size / 1e9:.3f} GB")
