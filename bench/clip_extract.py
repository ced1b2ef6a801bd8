"""extract-features' preparation of a video's clips, from the videos against from a clip set, in one run.

    python -m bench.clip_extract [--rounds 2]

On the clip set bench.c3d_train builds once (make-demo-videos, 4 classes, 240x320; build-clips at
112x112 crops, JPEG frames) and the videos it was built from, one core (OpenCV on one thread):
  (v) from the videos: decode, resize to 128x171, the LR copy, DIS flow of both, center crops
      (prepare_video: what extract-features VIDEOS does for every video)
  (c) from the clip set: read the units, decode their JPEG frames, upsample LR, center crops
      (prepare_from_clips: what extract-features --clips does)
Both give the four (units, 16, 112, 112, 3) stacks C3D reads. On a GPU C3D waited 87% of the time for
(v) with one preparing worker (BENCHMARKS.md); (c)'s rate says how many cores keep it busy instead.
"""

import argparse
import os
import time

from bench.c3d_train import CLIPS, build_clip_set


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="alternating passes over every video; the best counts")
    ap.add_argument("--work", default=CLIPS)
    args = ap.parse_args()
    import cv2

    from ingest.c3d.extract import ExtractConfig
    from ingest.c3d.sources import plan_source, prepare_from_clips
    from ingest.videos.frames import FrameOptions, prepare_video
    from ingest.videos.splits import plan_videos

    cv2.setNumThreads(1)
    clip_set = build_clip_set(args.work)
    from_clips = {j.id: j for j in plan_source(None, None, ExtractConfig(random_c3d=0, clips=clip_set)).jobs}
    videos = plan_videos(os.path.join(args.work, "videos"), os.path.join(args.work, "splits")).jobs
    options = FrameOptions(side=112)
    best = {"v": float("inf"), "c": float("inf")}
    units = sum(j.units for j in from_clips.values())
    for _ in range(args.rounds):
        took = {"v": 0.0, "c": 0.0}
        for job in videos:
            t = time.perf_counter()
            a = prepare_video(job.path, job.class_name, job.video, options)
            took["v"] += time.perf_counter() - t
            t = time.perf_counter()
            b = prepare_from_clips(from_clips[job.id], 112)
            took["c"] += time.perf_counter() - t
            assert {s: v.shape for s, v in a.clips.items()} == {s: v.shape for s, v in b.clips.items()}
        best = {k: min(best[k], took[k]) for k in best}
    print(f"{len(videos)} videos, {units} units, one core (best of {args.rounds}):")
    print(f"(v) from the videos (decode, resize, DIS flow)   {units / best['v']:8.1f} units/s")
    print(f"(c) from the clip set (read, JPEG decode, crop)  {units / best['c']:8.1f} units/s = "
          f"{best['v'] / best['c']:.1f}x (v)")


if __name__ == "__main__":
    main()
