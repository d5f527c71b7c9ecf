import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from triview.cli import main
from triview.demo import write_digits


def test_demo_data_is_the_real_digits_as_jpeg_class_folders(tmp_path):
    counts = write_digits(tmp_path, size=64)
    truth = np.bincount(load_digits().target)
    assert counts == {str(d): int(n) for d, n in enumerate(truth)}
    assert sum(counts.values()) == 1797
    files = sorted((tmp_path / "3").glob("*.jpg"))
    assert len(files) == truth[3]
    with Image.open(files[0]) as img:
        assert img.format == "JPEG" and img.size == (64, 64)
        # a real digit: ink on a dark background, not a blank canvas
        assert np.asarray(img).std() > 30


def test_demo_data_cli_limits_per_class(tmp_path, capsys):
    assert main(["demo-data", str(tmp_path / "d"), "--per-class", "5", "--size", "48"]) == 0
    assert len(list((tmp_path / "d").rglob("*.jpg"))) == 50
    assert "wrote 50 digit images in 10 class folders" in capsys.readouterr().out
