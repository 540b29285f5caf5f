"""Dataset index files as driving teams keep them, generated for tests (and nothing else).

Nesting as the real tools write it: mmdetection3d create_data (v1 infos, numpy arrays inside) and
update_infos_to_v2 (v2 data_list, file names relative to data_prefix), COCO annotation JSON,
nuScenes-devkit sample_data.json. Each generator returns the document and the file names it
placed per directory, so tests build the keys they expect without reading the index back.
"""
from __future__ import annotations

import json
import random

import numpy as np

CAMS = ["CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT"]
LOG = "n015-2018-07-24-11-22-45+0800"


def tok(rng: random.Random) -> str:
    return f"{rng.getrandbits(128):032x}"


def _lidar_name(ts: int) -> str:
    return f"{LOG}__LIDAR_TOP__{ts}.pcd.bin"


def _cam_name(cam: str, ts: int) -> str:
    return f"{LOG}__{cam}__{ts}.jpg"


def nuscenes_v1_infos(n: int, sweeps: int = 3, seed: int = 1) -> tuple[dict, dict[str, list[str]]]:
    """mmdet3d v1 nuScenes infos: {infos: [...], metadata}; numpy arrays as create_data writes them.
    Returns (document, {"samples/LIDAR_TOP": [names], "samples/CAM_x": [...], "sweeps/LIDAR_TOP": [...]})."""
    rng = random.Random(seed)
    placed: dict[str, list[str]] = {}
    infos = []
    for i in range(n):
        ts = 1532402927647951 + i * 500_000
        sw = []
        for j in range(sweeps):
            name = _lidar_name(ts - (j + 1) * 50_000)
            placed.setdefault("sweeps/LIDAR_TOP", []).append(name)
            sw.append({
                "data_path": f"./data/nuscenes/sweeps/LIDAR_TOP/{name}", "type": "lidar",
                "sample_data_token": tok(rng), "sensor2ego_translation": [0.985, 0.0, 1.84],
                "sensor2ego_rotation": [0.706, -0.015, 0.017, -0.707], "ego2global_translation": [600.1, 1647.5, 0.0],
                "ego2global_rotation": [0.57, -0.002, 0.011, -0.82], "timestamp": ts - (j + 1) * 50_000,
                "sensor2lidar_rotation": np.eye(3), "sensor2lidar_translation": np.zeros(3),
            })
        cams = {}
        for cam in CAMS:
            name = _cam_name(cam, ts + 12_000)
            placed.setdefault(f"samples/{cam}", []).append(name)
            cams[cam] = {
                "data_path": f"./data/nuscenes/samples/{cam}/{name}", "type": cam, "sample_data_token": tok(rng),
                "sensor2ego_translation": [1.7, 0.01, 1.51], "sensor2ego_rotation": [0.5, -0.5, 0.5, -0.5],
                "ego2global_translation": [600.1, 1647.5, 0.0], "ego2global_rotation": [0.57, -0.002, 0.011, -0.82],
                "timestamp": ts + 12_000, "sensor2lidar_rotation": np.eye(3, dtype=np.float64),
                "sensor2lidar_translation": np.array([0.0, 0.1, -0.3]),
                "cam_intrinsic": np.array([[1266.4, 0.0, 816.3], [0.0, 1266.4, 491.5], [0.0, 0.0, 1.0]]),
            }
        lidar = _lidar_name(ts)
        placed.setdefault("samples/LIDAR_TOP", []).append(lidar)
        k = rng.randint(0, 20)
        infos.append({
            "lidar_path": f"./data/nuscenes/samples/LIDAR_TOP/{lidar}", "token": tok(rng), "sweeps": sw, "cams": cams,
            "lidar2ego_translation": [0.985, 0.0, 1.84], "lidar2ego_rotation": [0.706, -0.015, 0.017, -0.707],
            "ego2global_translation": [600.1, 1647.5, 0.0], "ego2global_rotation": [0.57, -0.002, 0.011, -0.82],
            "timestamp": ts,
            "gt_boxes": np.array([[rng.uniform(-50, 50) for _ in range(7)] for _ in range(k)], dtype=np.float64).reshape(k, 7),
            "gt_names": np.array([rng.choice(["car", "pedestrian", "barrier", "traffic_cone"]) for _ in range(k)]),
            "gt_velocity": np.zeros((k, 2)), "num_lidar_pts": np.array([rng.randint(0, 900) for _ in range(k)]),
            "num_radar_pts": np.zeros(k, dtype=np.int64), "valid_flag": np.ones(k, dtype=bool),
        })
    return {"infos": infos, "metadata": {"version": "v1.0-trainval"}}, placed


def nuscenes_v2_infos(n: int, sweeps: int = 3, seed: int = 2) -> tuple[dict, dict[str, list[str]]]:
    """mmdet3d v2 (update_infos_to_v2): data_list with file NAMES relative to data_prefix."""
    rng = random.Random(seed)
    placed: dict[str, list[str]] = {}
    data_list = []
    for i in range(n):
        ts = 1533151603547590 + i * 500_000
        images = {}
        for cam in CAMS:
            name = _cam_name(cam, ts + 7_000)
            placed.setdefault(f"samples/{cam}", []).append(name)
            images[cam] = {"img_path": name, "cam2img": [[1266.4, 0.0, 816.3], [0.0, 1266.4, 491.5], [0.0, 0.0, 1.0]],
                           "sample_data_token": tok(rng), "timestamp": (ts + 7_000) / 1e6,
                           "cam2ego": [[0.0] * 4] * 4, "lidar2cam": [[1.0] * 4] * 4}
        lidar = _lidar_name(ts)
        placed.setdefault("samples/LIDAR_TOP", []).append(lidar)
        lsw = []
        for j in range(sweeps):
            name = _lidar_name(ts - (j + 1) * 50_000)
            placed.setdefault("sweeps/LIDAR_TOP", []).append(name)
            lsw.append({"lidar_points": {"lidar_path": f"./data/nuscenes/sweeps/LIDAR_TOP/{name}", "lidar2ego": [[1.0] * 4] * 4,
                                         "lidar2sensor": [[0.0] * 4] * 4},
                        "ego2global": [[0.0] * 4] * 4, "timestamp": (ts - (j + 1) * 50_000) / 1e6, "sample_data_token": tok(rng)})
        data_list.append({
            "sample_idx": i, "token": tok(rng), "timestamp": ts / 1e6, "ego2global": [[0.0] * 4] * 4,
            "images": images, "lidar_points": {"num_pts_feats": 5, "lidar_path": lidar, "lidar2ego": [[1.0] * 4] * 4},
            "lidar_sweeps": lsw,
            "instances": [{"bbox_3d": [rng.uniform(-50, 50) for _ in range(7)], "bbox_label": 0, "bbox_label_3d": 0,
                           "velocity": [0.0, 0.0], "num_lidar_pts": np.int64(rng.randint(1, 500)), "bbox_3d_isvalid": np.bool_(True)}
                          for _ in range(rng.randint(0, 5))],
            "cam_instances": {cam: [] for cam in CAMS},
        })
    meta = {"categories": {"car": 0, "pedestrian": 7}, "dataset": "nuscenes", "version": "v1.0-trainval", "info_version": "1.1"}
    return {"metainfo": meta, "data_list": data_list}, placed


def plain(o: object) -> object:
    """numpy -> JSON values (how teams export infos to JSON)."""
    return o.tolist() if isinstance(o, (np.ndarray, np.generic)) else o


def under(prefix: str, placed: dict[str, list[str]], dirs: list[str] | None = None) -> list[str]:
    return [f"{prefix}/{d}/{name}" for d in (dirs or list(placed)) for name in placed[d]]


def coco(n_images: int, annotations_first: bool = False, seed: int = 3) -> tuple[str, list[str]]:
    rng = random.Random(seed)
    names = [f"{rng.randrange(10**12):012d}.jpg" for _ in range(n_images)]
    images = [{"license": 3, "file_name": nm, "coco_url": f"http://images.cocodataset.org/train2017/{nm}", "height": 427,
               "width": 640, "date_captured": "2013-11-14 11:18:45", "id": i} for i, nm in enumerate(names)]
    anns = [{"segmentation": [[rng.uniform(0, 600) for _ in range(16)]], "area": 702.1, "iscrowd": 0, "image_id": i % n_images,
             "bbox": [473.07, 395.93, 38.65, 28.67], "category_id": 18, "id": 1000 + i} for i in range(3 * n_images)]
    parts: list[tuple[str, object]] = [("info", {"description": "COCO 2017 Dataset", "version": "1.0", "year": 2017}),
                                       ("licenses", [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1}])]
    body = [("annotations", anns), ("images", images)] if annotations_first else [("images", images), ("annotations", anns)]
    parts += body + [("categories", [{"supercategory": "animal", "id": 18, "name": "dog"}])]
    return json.dumps(dict(parts), indent=1), names
