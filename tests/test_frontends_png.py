"""One request, three front-ends, one PNG: `terdit-edge generate`, the server's job API and a sampling
job (`terdit-edge sample --png`) write byte-identical files for the same model, class, seed and settings.

The sampling job derives its seed from the global seed and the sample index, so the other two are
given that seed. The CLI upscales small images by default, so it is told not to (--upscale 1).
"""
from __future__ import annotations

import numpy as np
import pytest

from terdit_edge.frontends.cli import main
from terdit_edge.scale import sample_seed

CLASS = 3
SETTINGS_ARGS = ["--steps", "6", "--sampler", "ddim", "--cfg", "3.5", "--guidance-interval", "100,800"]
REQUEST = {"steps": 6, "sampler": "ddim", "cfg_scale": 3.5, "guidance_interval": [100, 800]}


def test_cli_server_and_sampling_job_write_the_same_png_bytes(tmp_path):
    pytest.importorskip("uvicorn", reason="the server extra is not installed")
    httpx = pytest.importorskip("httpx", reason="the server-test extra is not installed")
    from tests.server_util import LiveServer, bundled_manager

    seed = sample_seed(0, 0)  # sample 0 of a job with global seed 0
    pngs = {}

    cli_png = tmp_path / "cli.png"
    assert main(["generate", "--class", str(CLASS), *SETTINGS_ARGS, "--seed", str(seed), "--upscale", "1",
                 "--threads", "1", "--out", str(cli_png), "--no-progress"]) == 0
    pngs["cli"] = cli_png.read_bytes()

    labels = tmp_path / "labels.npy"
    np.save(labels, np.array([CLASS], dtype=np.int64))
    job = tmp_path / "job"
    assert main(["sample", "-n", "1", "--out", str(job), "--labels", str(labels), *SETTINGS_ARGS, "--threads", "1",
                 "--png", "--no-progress"]) == 0
    pngs["sample"] = (job / "png" / "000000.png").read_bytes()

    server = LiveServer(bundled_manager()).start()
    try:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            created = c.post("/v1/jobs", json={"class": CLASS, "seed": seed, **REQUEST})
            assert created.status_code == 202, created.text
            job_id = created.json()["id"]
            with c.stream("GET", f"/v1/jobs/{job_id}/events") as r:  # ends with the job
                for _ in r.iter_lines():
                    pass
            state = c.get(f"/v1/jobs/{job_id}").json()
            assert state["status"] == "succeeded", state
            pngs["server"] = c.get(f"/v1/jobs/{job_id}/images/0.png").content
    finally:
        server.stop()

    assert pngs["cli"][:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image
    meta = Image.open(cli_png).text
    assert meta["seed"] == str(seed) and meta["class"] == str(CLASS) and meta["guidance_interval"] == "100,800"
    assert meta["cfg"] == "3.5" and meta["steps"] == "6" and meta["sampler"] == "ddim"
    assert pngs["cli"] == pngs["server"] == pngs["sample"], {k: len(v) for k, v in pngs.items()}
