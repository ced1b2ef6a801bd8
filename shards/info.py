"""info: a summary of a shard set (features or clips), from its manifest alone."""

from .shardset import ShardSet


def shard_set_info(shards_dir: str) -> dict:
    s = ShardSet.open(shards_dir, content=None)
    m = s.manifest
    phases = [s.phase(split, phase).summary() for split in s.splits for phase in s.phases(split)]
    info = {"path": shards_dir, "content": m.get("content", "features"), "classes": len(s.classes),
            "formats": m["options"]["formats"], "tool_version": m["tool_version"], "phases": phases}
    if info["content"] == "clips":
        return {**info, "clips": m["clips"], "source": m["source"]["videos"]}
    return {**info, "dim": s.dim, "dtype": m["dtype"], "source": m["source"]["root"]}


def describe_clips(clips: dict) -> str:
    """A clip set's "clips" record as one line: what a unit holds and how it is stored."""
    (h, w), (lh, lw) = clips["size"], clips["lr_size"]
    return (f"{clips['frames']}-frame clips: HR RGB {h}x{w} and LR RGB {lh}x{lw} (raw), HR and LR flow images "
            f"{h}x{w} ({clips['flow']}, bound {clips['flow_bound']:g}); frames stored as {clips['storage']}"
            + (f" (quality {clips['quality']})" if clips["storage"] == "jpeg" else ""))


def format_info(info: dict) -> str:
    clips = info["content"] == "clips"
    lines = [
        f"{'clip set' if clips else 'shard set':<11}{info['path']}",
        f"{'videos' if clips else 'source':<11}{info['source']}",
        f"classes {info['classes']}, " + (describe_clips(info["clips"]) if clips else
                                          f"dim {info['dim']}, dtype {info['dtype']}, formats {', '.join(info['formats'])}"),
        "",
        f"{'split/phase':<22}{'videos':>8}{'skipped':>9}{'units':>9}{'classes':>9}{'shards':>8}{'tar MB':>10}"
        + ("" if clips else f"{'zarr MB':>10}"),
    ]
    rows = info["phases"] + [{"split": "total", "phase": None, "classes": "",
                              **{k: sum(p[k] for p in info["phases"])
                                 for k in ("videos", "skipped", "units", "tar_shards", "tar_bytes", "zarr_bytes")}}]
    for p in rows:
        name = p["split"] + ("/" + p["phase"] if p["phase"] else "")
        lines.append(f"{name:<22}{p['videos']:>8}{p['skipped']:>9}{p['units']:>9}{p['classes']:>9}{p['tar_shards']:>8}"
                     f"{p['tar_bytes'] / 1e6:>10.1f}" + ("" if clips else f"{p['zarr_bytes'] / 1e6:>10.1f}"))
    return "\n".join(lines)
