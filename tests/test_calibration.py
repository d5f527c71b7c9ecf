"""Calibration against OpenCV's own reference photos and a synthetic known lens."""
import json
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from triview.calibration import (CalibrationError, board_points, calibrate_chessboard,
                                 load_intrinsics, parse_pattern)
from triview.cli import main
from triview.crop import CropGeometry, LensModel, crop_views, undistort, undistort_maps


def _opencv_samples() -> Path:
    try:
        files = subprocess.run(["dpkg", "-L", "opencv-doc"], capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("Debian's opencv-doc is not installed (.ci/run installs it)")
    left01 = [f for f in files if f.endswith("/left01.jpg")]
    if not left01:
        pytest.skip("opencv-doc has no left01.jpg")
    return Path(left01[0]).parent


def test_reproduces_opencvs_reference_calibration_of_left01_14(tmp_path):
    data = _opencv_samples()
    photos = sorted(data.glob("left[01][0-9].jpg"))
    assert len(photos) == 13  # left01..left14, there is no left10
    cal = calibrate_chessboard(photos, pattern=(9, 6), square=1.0)
    assert cal.rms == pytest.approx(0.196, abs=0.01)
    reference = np.array([[532.80992189, 0, 342.4952186], [0, 532.93346422, 233.8879292], [0, 0, 1]])
    assert np.abs(np.array(cal.K) - reference).sum() < 10  # OpenCV's test: L1 tolerance 10
    assert cal.image_size == (640, 480) and len(cal.per_view_error) == 13
    assert all(0 < e < 1 for e in cal.per_view_error.values())

    out = tmp_path / "calib.json"
    assert main(["calibrate", "--images", str(data / "left[01][0-9].jpg"), "--pattern", "9x6",
                 "--square", "1.0", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert {"rms", "K", "dist", "image_size", "per_view_error"} <= set(saved)
    assert np.array(saved["K"]).shape == (3, 3) and saved["rms"] == pytest.approx(cal.rms)


def test_a_stray_photo_first_or_last_and_mixed_sizes_do_not_veto_the_boards(tmp_path, capsys):
    data = _opencv_samples()
    boards = sorted(data.glob("left[01][0-9].jpg"))
    stray = data / "left.jpg"   # 612x459, no board, sorts before left01.jpg
    # the bar of issue 16: OpenCV's own folder, stray first
    out = tmp_path / "calib.json"
    assert main(["calibrate", "--images", str(data / "left*.jpg"), "--pattern", "9x6",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["rms"] == pytest.approx(0.196, abs=0.01) and saved["image_size"] == [640, 480]
    assert saved["rejected"] == {"left.jpg": "board not found (612x459)"}
    assert "from 13 of 14 images" in printed and "left.jpg: board not found" in printed

    # stray last: the same calibration, the stray named
    last = tmp_path / "last"
    last.mkdir()
    for photo in boards:
        (last / photo.name).symlink_to(photo)
    (last / "zz_stray.jpg").symlink_to(stray)
    cal = calibrate_chessboard(sorted(last.iterdir()))
    assert cal.rms == pytest.approx(saved["rms"], abs=1e-9)
    assert cal.rejected == {"zz_stray.jpg": "board not found (612x459)"}

    # mixed sizes: five boards at 3/4 size sort first; the eight full-size ones win
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for k, photo in enumerate(boards):
        if k < 5:
            small = cv2.resize(cv2.imread(str(photo)), (480, 360), interpolation=cv2.INTER_AREA)
            cv2.imwrite(str(mixed / f"a_half_{photo.name}"), small)
        else:
            (mixed / photo.name).symlink_to(photo)
    cal = calibrate_chessboard(sorted(mixed.iterdir()))
    assert cal.image_size == (640, 480) and len(cal.per_view_error) == 8
    assert set(cal.rejected) == {f"a_half_{p.name}" for p in boards[:5]}
    assert all(why.startswith("size 480x360 differs from 640x480") for why in cal.rejected.values())


def _render_board(K, dist, rvec, tvec, size=(640, 480), pattern=(9, 6), square=40.0):
    """Render a chessboard seen through a known camera: each output pixel is traced
    back through the lens onto the board plane (via OpenCV's own undistortPoints)."""
    w, h = size
    R, _ = cv2.Rodrigues(rvec)
    H = K @ np.column_stack([R[:, 0], R[:, 1], tvec.ravel()])   # board plane -> ideal pixels
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    pix = np.stack([xs.ravel(), ys.ravel()], 1).reshape(-1, 1, 2)
    ideal = cv2.undistortPoints(pix, K, dist, P=K).reshape(-1, 2)  # distorted -> ideal pixels
    ideal_h = np.column_stack([ideal, np.ones(len(ideal))])
    board = (np.linalg.inv(H) @ ideal_h.T).T
    bx, by = board[:, 0] / board[:, 2], board[:, 1] / board[:, 2]
    cells_x, cells_y = pattern[0] + 1, pattern[1] + 1
    u, v = bx / square + 1, by / square + 1      # corners at integer (u, v) in 1..pattern
    inside = (u >= 0) & (u < cells_x) & (v >= 0) & (v < cells_y)
    dark = ((np.floor(u) + np.floor(v)) % 2 == 0) & inside
    img = np.full(w * h, 255, np.uint8)
    img[dark] = 0
    img = img.reshape(h, w)
    return cv2.GaussianBlur(img, (3, 3), 0)


def test_recovers_a_known_synthetic_distortion(tmp_path):
    K = np.array([[500.0, 0, 320], [0, 500.0, 240], [0, 0, 1]])
    dist = np.array([-0.25, 0.08, 0.0, 0.0, 0.0])
    rng = np.random.default_rng(0)
    paths = []
    for i in range(10):
        rvec = rng.uniform(-0.35, 0.35, 3)
        tvec = np.array([-180.0 + rng.uniform(-40, 40), -120.0 + rng.uniform(-30, 30),
                         rng.uniform(650, 850)])
        img = _render_board(K, dist, rvec, tvec)
        path = tmp_path / f"board{i:02d}.png"
        cv2.imwrite(str(path), img)
        paths.append(path)
    cal = calibrate_chessboard(paths, pattern=(9, 6), square=40.0)
    assert len(cal.rejected) <= 2
    assert cal.rms < 0.5
    assert np.allclose(np.array(cal.K)[[0, 1, 0, 1], [0, 1, 2, 2]], [500, 500, 320, 240], rtol=0.02)
    assert cal.dist[0] == pytest.approx(-0.25, abs=0.05)

    # undistorting with the recovered lens straightens what the lens bent
    lens = LensModel(K=cal.K, dist=cal.dist, image_size=cal.image_size)
    # a frame-filling, head-on board: its rows bend visibly through the lens
    img = _render_board(K, dist, np.zeros(3), np.array([-200.0, -140.0, 450.0]))
    straight = undistort(img, undistort_maps(lens, 640, 480))
    found_before, c0 = cv2.findChessboardCorners(img, (9, 6))
    found_after, c1 = cv2.findChessboardCorners(straight, (9, 6))
    assert found_before and found_after

    def line_error(corners):
        pts = corners.reshape(6, 9, 2)
        errs = []
        for row in pts:  # residual of a straight-line fit through each board row
            A = np.column_stack([row[:, 0], np.ones(9)])
            _, res, _, _ = np.linalg.lstsq(A, row[:, 1], rcond=None)
            errs.append(float(np.sqrt(res[0] / 9)) if res.size else 0.0)
        return max(errs)

    assert line_error(c1) < line_error(c0) / 2


def test_maps_scale_to_other_image_sizes_and_roi_crops():
    lens = LensModel(K=[[500.0, 0, 320], [0, 500.0, 240], [0, 0, 1]], dist=[-0.3, 0.1, 0, 0, 0],
                     image_size=(640, 480), alpha=0.0, crop_roi=True)
    maps = undistort_maps(lens, 320, 240)
    assert maps.map1.shape[:2] == (240, 320) and maps.roi is not None
    out = undistort(np.full((240, 320, 3), 200, np.uint8), maps)
    assert out.shape[0] <= 240 and out.shape[1] <= 320
    assert out.mean() > 190  # alpha=0 + ROI: no black borders left
    views = crop_views(np.full((240, 320, 3), 200, np.uint8), CropGeometry(layout="horizontal", image_size=16), maps)
    assert all(v.shape == (16, 16, 3) for v in views.values())


@pytest.mark.parametrize("suffix", [".yaml", ".xml"])
def test_intrinsics_files_opencv_yaml_xml_and_json(suffix, tmp_path):
    cam = tmp_path / f"cam{suffix}"
    fs = cv2.FileStorage(str(cam), cv2.FILE_STORAGE_WRITE)
    fs.write("image_width", 640)
    fs.write("image_height", 480)
    fs.write("camera_matrix", np.array([[510.0, 0, 330], [0, 511.0, 235], [0, 0, 1]]))
    fs.write("distortion_coefficients", np.array([[-0.2, 0.05, 0, 0, 0]]))
    fs.release()
    if suffix == ".xml":
        assert cam.read_text().startswith("<?xml")
    cal = load_intrinsics(cam)
    assert cal.K[0][0] == 510 and cal.dist[0] == pytest.approx(-0.2) and cal.image_size == (640, 480)
    lens = LensModel.from_file(cam)
    assert lens.camera_matrix(320, 240)[0, 0] == pytest.approx(255)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(CalibrationError, match="no 'K'"):
        load_intrinsics(tmp_path / "bad.json")


def test_bad_calibration_inputs_are_clear_errors(tmp_path, capsys):
    with pytest.raises(CalibrationError, match="9x6"):
        parse_pattern("nine by six")
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((100, 100), 255, np.uint8))
    cv2.imwrite(str(tmp_path / "other.png"), np.full((60, 80), 255, np.uint8))
    (tmp_path / "text.png").write_text("not a picture")
    with pytest.raises(CalibrationError, match="found in only 0 of 3") as err:
        calibrate_chessboard([blank, tmp_path / "other.png", tmp_path / "text.png"])
    # every photo that was not used is named with why, in the message and the exception
    assert "blank.png: board not found (100x100)" in str(err.value)
    assert "other.png: board not found (80x60)" in str(err.value)
    assert err.value.rejected["text.png"] == "undecodable"
    assert main(["calibrate", "--images", str(tmp_path / "none*.jpg"), "--out",
                 str(tmp_path / "c.json")]) == 2
    assert "no files match" in capsys.readouterr().err
    assert board_points((3, 2), 2.0)[-1].tolist() == [4.0, 2.0, 0.0]


def test_calibrate_and_crop_stage_calibrates_saves_and_applies_the_lens(ingested, cropped, tmp_path):
    from triview import manifest as mf
    from triview.crop import read_crop, read_geometry
    from triview.stages import calibrate_and_crop_stage

    data = _opencv_samples()
    out = tmp_path / "views"
    # left*.jpg includes the stray left.jpg: the same size rule as the CLI
    rec = calibrate_and_crop_stage(ingested, out, image_size=32,
                                   calibration_images=str(data / "left*.jpg"))
    assert rec["lens"] == "calibrated" and rec["calibration"]["rms"] == pytest.approx(0.196, abs=0.01)
    assert rec["calibration"]["rejected"] == {"left.jpg": "board not found (612x459)"}
    saved = load_intrinsics(out / "calibration.json")
    _, lens = read_geometry(out)
    assert lens.K == saved.K and tuple(lens.image_size) == (640, 480)
    views, plain = mf.read_views(out), mf.read_views(cropped)
    assert len(views) == len(plain)
    a = read_crop(out, views["path"].iloc[0]).astype(float)
    b = read_crop(cropped, plain["path"].iloc[0]).astype(float)
    assert np.abs(a - b).mean() > 1  # the lens changed the pixels
    # and the saved calibration is reusable as calibration_file
    again = calibrate_and_crop_stage(ingested, tmp_path / "again", image_size=32,
                                     calibration_file=str(out / "calibration.json"))
    assert again["lens"] == "calibrated"
    assert np.array_equal(read_crop(tmp_path / "again", views["path"].iloc[0]).astype(float), a)
