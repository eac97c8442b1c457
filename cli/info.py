"""`dsv4 info`: what a checkpoint (or preset) is, where its bytes are, what its KV costs."""
from __future__ import annotations

import json

import click


def _gb(b: float) -> str:
    return f"{b / 1e9:.3f} GB" if b >= 1e8 else f"{b / 1e6:.2f} MB"


@click.command()
@click.option("--model", "-m", default=None, metavar="DIR|PRESET",
              help="Checkpoint folder or preset name (tiny, small; made on first use).")
@click.option("--preset", type=click.Choice(["tiny", "small", "flash", "pro"]), default=None,
              help="Describe a preset without a checkpoint (sizes computed, nothing written).")
@click.option("--layers", type=click.IntRange(min=1), default=None, help="With --preset.")
@click.option("--experts", type=click.IntRange(min=1), default=None, help="With --preset.")
@click.option("--ctx", "contexts", type=click.IntRange(min=1), multiple=True,
              help="Context length(s) to size the KV cache for (default: 4096, 131072, 1M).")
@click.option("--tensors", is_flag=True, help="List every tensor (name, dtype, shape).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(model, preset, layers, experts, contexts, tensors, as_json):
    """Summarise a model: config, tensor inventory and bytes by format and component,
    weight bytes per decoded token, and KV-cache bytes per token and per context."""
    from dsv4.runtime.config import ModelConfig  # noqa: PLC0415
    from dsv4.runtime.errors import DsvError  # noqa: PLC0415
    from dsv4.runtime.footprint import bytes_by_component, bytes_per_token  # noqa: PLC0415
    from dsv4.runtime.kv_plan import plan, reference_bf16_per_token  # noqa: PLC0415
    from dsv4.runtime.model_store import resolve_model  # noqa: PLC0415
    from dsv4.runtime.params import load_weights  # noqa: PLC0415
    from dsv4.runtime.presets import preset_config  # noqa: PLC0415
    from dsv4.runtime.weights import Checkpoint  # noqa: PLC0415

    if (model is None) == (preset is None):
        raise DsvError("give exactly one of --model or --preset")
    ckpt = None
    if preset:
        cfg = ModelConfig.from_hf(preset_config(preset, layers, experts), f"preset '{preset}'")
        source = f"preset {preset}"
    else:
        folder = resolve_model(model)
        cfg, ckpt = ModelConfig.load(folder), Checkpoint(folder)
        load_weights(ckpt, cfg)               # validates every tensor against the config
        source = str(folder)
    contexts = contexts or (4096, 131072, 1 << 20)
    kinds = [cfg.layer_kind(i) for i in range(cfg.n_layers)]
    comp = bytes_by_component(cfg, ckpt)
    per_tok = bytes_per_token(cfg, ckpt)
    kv = {s: plan(cfg, s) for s in ("fp8", "bf16", "f32")}
    report = {
        "source": source,
        "config": {k: v for k, v in cfg.to_dict().items() if k != "compress_ratios"},
        "layers": {"SWA": kinds.count("SWA"), "CSA": kinds.count("CSA"),
                   "HCA": kinds.count("HCA"), "hash": cfg.n_hash_layers, "mtp": cfg.n_mtp_layers},
        "bytes_by_component": comp,
        "bytes_by_dtype": ckpt.bytes_by_dtype() if ckpt else None,
        "weight_bytes_per_decoded_token": per_tok,
        "kv_bytes_per_token": {s: p.per_token for s, p in kv.items()},
        "kv_bytes_per_token_reference_bf16": reference_bf16_per_token(cfg),
        "kv_bytes": {str(t): {s: p.total(t) for s, p in kv.items()} for t in contexts},
    }
    if tensors and ckpt:
        report["tensors"] = [[n, ckpt.info(n).dtype, list(ckpt.info(n).shape)]
                             for n in ckpt.names()]
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    c = cfg
    click.echo(f"{source}")
    click.echo(f"  hidden {c.dim}, {c.n_layers} layers ({report['layers']['SWA']} SWA, "
               f"{report['layers']['CSA']} CSA m=4, {report['layers']['HCA']} HCA, "
               f"{c.n_hash_layers} hash-routed) + {c.n_mtp_layers} MTP")
    click.echo(f"  attention: {c.n_heads} heads x {c.head_dim} (rope {c.rope_dim}), q rank "
               f"{c.q_lora_rank}, out {c.o_groups} groups x {c.o_lora_rank}, window {c.window}, "
               f"indexer {c.index_n_heads} x {c.index_head_dim} top-{c.index_topk}")
    click.echo(f"  MoE: {c.n_routed_experts} experts, {c.n_activated_experts} active, "
               f"inner {c.moe_inter_dim}, {c.score_func}, scale {c.route_scale}, "
               f"swiglu limit {c.swiglu_limit}; vocab {c.vocab_size}")
    click.echo(f"checkpoint bytes: {_gb(sum(comp.values()))}")
    for k, v in sorted(comp.items(), key=lambda kv: -kv[1]):
        click.echo(f"  {k:<18} {_gb(v)}")
    if ckpt:
        click.echo("by on-disk dtype:")
        for k, v in sorted(ckpt.bytes_by_dtype().items(), key=lambda kv: -kv[1]):
            click.echo(f"  {k:<18} {_gb(v)}")
    click.echo(f"weight bytes per decoded token: {_gb(sum(per_tok.values()))}")
    for k, v in sorted(per_tok.items(), key=lambda kv: -kv[1]):
        click.echo(f"  {k:<18} {_gb(v)}")
    click.echo(f"KV cache per token: {kv['fp8'].per_token:.1f} B (FP8/FP4 lossless storage), "
               f"{kv['bf16'].per_token:.1f} B (bf16), {kv['f32'].per_token:.1f} B (exact mode); "
               f"official code allocates {report['kv_bytes_per_token_reference_bf16']:.1f} B")
    for t in contexts:
        click.echo(f"  context {t:>8}: {kv['fp8'].total(t) / 2**30:.3f} GiB "
                   f"(bf16 {kv['bf16'].total(t) / 2**30:.3f}, exact {kv['f32'].total(t) / 2**30:.3f})")
    for row in report.get("tensors", []):
        click.echo(f"  {row[0]}  {row[1]}  {row[2]}")
