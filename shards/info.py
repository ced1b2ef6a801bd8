"""info: a summary of a shard set, from its manifest alone."""

from .shardset import ShardSet


def shard_set_info(shards_dir: str) -> dict:
    s = ShardSet.open(shards_dir)
    m = s.manifest
    phases = [s.phase(split, phase).summary() for split in s.splits for phase in s.phases(split)]
    return {"path": shards_dir, "classes": len(s.classes), "dim": s.dim, "dtype": m["dtype"],
            "formats": m["options"]["formats"], "tool_version": m["tool_version"],
            "source": m["source"]["root"], "phases": phases}


def format_info(info: dict) -> str:
    lines = [
        f"shard set  {info['path']}",
        f"source     {info['source']}",
        f"classes {info['classes']}, dim {info['dim']}, dtype {info['dtype']}, formats {', '.join(info['formats'])}",
        "",
        f"{'split/phase':<22}{'videos':>8}{'skipped':>9}{'units':>9}{'classes':>9}{'shards':>8}{'tar MB':>10}{'zarr MB':>10}",
    ]
    for p in info["phases"]:
        lines.append(f"{p['split'] + '/' + p['phase']:<22}{p['videos']:>8}{p['skipped']:>9}{p['units']:>9}"
                     f"{p['classes']:>9}{p['tar_shards']:>8}{p['tar_bytes'] / 1e6:>10.1f}{p['zarr_bytes'] / 1e6:>10.1f}")
    t = info["phases"]
    lines.append(f"{'total':<22}{sum(p['videos'] for p in t):>8}{sum(p['skipped'] for p in t):>9}"
                 f"{sum(p['units'] for p in t):>9}{'':>9}{sum(p['tar_shards'] for p in t):>8}"
                 f"{sum(p['tar_bytes'] for p in t) / 1e6:>10.1f}{sum(p['zarr_bytes'] for p in t) / 1e6:>10.1f}")
    return "\n".join(lines)
