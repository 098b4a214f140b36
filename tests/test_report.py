"""report.html building blocks: the PNG encoder round-trips, the grid places every probe, the SVG
plots are well-formed XML with one bar group per row and escape their labels."""

from __future__ import annotations

import struct
import xml.etree.ElementTree as ET
import zlib

import numpy as np
import pytest

from kdd_jax.report import png_bytes, probe_grid, svg_histogram_rows, svg_lines


def decode_png(data: bytes) -> np.ndarray:
    """Minimal decoder for what png_bytes writes (8-bit grey/RGB, filter 0), checking every CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos: pos + 4])
        tag, body = data[pos + 4: pos + 8], data[pos + 8: pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n: pos + 12 + n])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF
        chunks[tag] = chunks.get(tag, b"") + body
        pos += 12 + n
    w, h, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    c = {0: 1, 2: 3}[color]
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, 1 + w * c)
    assert depth == 8 and (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(h, w, c).squeeze(-1) if c == 1 else raw[:, 1:].reshape(h, w, c)


@pytest.mark.parametrize("shape", [(5, 7), (4, 6, 3)])
def test_png_round_trips(shape):
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    np.testing.assert_array_equal(decode_png(png_bytes(img)), img)


def test_png_refuses_other_layouts():
    with pytest.raises(ValueError, match="uint8"):
        png_bytes(np.zeros((2, 2, 4), np.uint8))


def test_probe_grid_places_every_probe_scaled_and_clipped():
    x = np.zeros((5, 1, 3, 3), np.float32)
    for i in range(5):
        x[i] = i / 4
    x[4, 0, 0, 0] = 9.0  # out of range: clipped
    g = probe_grid(x, (0.0, 1.0), cols=2, scale=2, pad=1)
    assert g.shape == (3 * (6 + 1) + 1, 2 * (6 + 1) + 1)
    for i in range(5):
        r, q = divmod(i, 2)
        tile = g[1 + r * 7: 1 + r * 7 + 6, 1 + q * 7: 1 + q * 7 + 6]
        expect = np.full((6, 6), int(i / 4 * 255 + 0.5), np.uint8)
        if i == 4:
            expect[:2, :2] = 255
        np.testing.assert_array_equal(tile, expect)
    rgb = probe_grid(np.random.default_rng(0).uniform(size=(3, 3, 4, 4)).astype(np.float32), (0.0, 1.0))
    assert rgb.ndim == 3 and rgb.shape[2] == 3


def test_svg_histograms_are_xml_with_one_group_per_row_and_escaped_labels():
    rows = [("<b>a&b", np.arange(10.0)), ("c", np.array([1.0, np.nan, 2.0])), ("empty", np.array([]))]
    svg = svg_histogram_rows(rows, x_label="x", markers={"c": 1.5}, vline=0.0)
    root = ET.fromstring(svg)
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert "<b>a&b" in texts and "c" in texts and "empty" in texts
    bars = [r for r in root.iter("{http://www.w3.org/2000/svg}rect")]
    assert sum(int(float(r.get("height")) > 0) for r in bars) >= 3  # both non-empty rows drew bars


def test_svg_lines_draw_each_series():
    svg = svg_lines({"a": ([1, 10, 100], [0.5, 0.7, 0.9], [0.1, 0.1, 0.05]), "b": ([1, 100], [0.2, 0.3], None)},
                    x_label="N", y_label="accuracy", log_x=True, y_range=(0, 1))
    root = ET.fromstring(svg)
    assert len(list(root.iter("{http://www.w3.org/2000/svg}path"))) == 2
    assert len(list(root.iter("{http://www.w3.org/2000/svg}circle"))) == 5
    with pytest.raises(ValueError):
        svg_lines({}, x_label="", y_label="")
