"""Editing through `terdit-edge serve` (issue 27): native edit jobs (POST /v1/jobs with a base64 picture
and mask), OpenAI's images.edit (multipart, driven by the official client), batching of compatible edits
(byte-identical to the same edit alone), and 4xx answers for bad uploads. On the bundled digits model;
every image is compared byte for byte with the Python API's."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

REASON = "the server tests need the server extras: pip install '.[server-test]'"
pytest.importorskip("starlette", reason=REASON)
pytest.importorskip("uvicorn", reason=REASON)
pytest.importorskip("multipart", reason=REASON)
httpx = pytest.importorskip("httpx", reason=REASON)

from PIL import Image  # noqa: E402

from terdit_edge.edit import EditSettings  # noqa: E402
from terdit_edge.pipeline import Pipeline  # noqa: E402
from terdit_edge.pngmeta import generation_metadata, png_bytes  # noqa: E402
from terdit_edge.settings import GenerationSettings  # noqa: E402
from tests.server_util import LiveServer, bundled_manager  # noqa: E402
from tests.test_edit import a_three  # noqa: E402
from tests.test_server import LONG, assert_json_error, events_of, submit, wait_final  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load()


@pytest.fixture(scope="module")
def server():
    s = LiveServer(bundled_manager(step_delay=0.002, max_queue=8, max_batch=8, max_image_pixels=64 * 64,
                                  max_upload_bytes=200_000)).start()
    yield s
    s.stop()


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def png_of(arr_or_img, fmt="PNG", **kw) -> bytes:
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def left_mask() -> np.ndarray:
    m = np.zeros((16, 16), np.uint8)
    m[:, :8] = 255
    return m


def expected_edit(pipe, image, cls, seeds, mask=None, steps=10, sampler="ddim", cfg=4.0, **edit) -> list[bytes]:
    """The PNGs the Python API gives for this edit (Pipeline.edit / inpaint), with the server's metadata."""
    es = EditSettings(**edit).for_mask(mask is not None)
    kw = dict(steps=steps, sampler=sampler, cfg_scale=cfg, seeds=seeds, **es.edit_kwargs(mask is not None))
    if mask is None:
        images = pipe.edit(image, [cls] * len(seeds), **kw)
    else:
        images = pipe.inpaint(image, mask, [cls] * len(seeds), **kw)
    meta = generation_metadata("digits.tdit", [cls] * len(seeds), seeds,
                               GenerationSettings(steps=steps, sampler=sampler, cfg_scale=cfg))
    meta.update(es.png_items(mask is not None))
    return [png_bytes(im, meta, k) for k, im in enumerate(images)]


def job_pngs(client, job_id) -> list[bytes]:
    d = wait_final(client, job_id)
    assert d["status"] == "succeeded", d
    return [client.get(u).content for u in d["images"]]


# -- native edit jobs ----------------------------------------------------------------------------------------


def test_edit_and_inpaint_jobs_give_the_python_apis_bytes(client, pipe):
    three = png_of(a_three())
    job = submit(client, **{"class": 8, "n": 2, "seed": 3, "steps": 10, "sampler": "ddim", "image": b64(three),
                            "strength": 0.7})
    assert job_pngs(client, job["id"]) == expected_edit(pipe, a_three(), 8, [3, 4], strength=0.7)
    state = client.get(job["status_url"]).json()
    assert state["edit"] == {"mode": "image-to-image", "strength": 0.7, "fit": "crop"}
    assert state["steps"] == 7 and state["durable"] is False  # the last round(0.7 * 10) steps; no store here
    got = Image.open(io.BytesIO(client.get(state["images"][0]).content))
    assert got.text["edit"] == "image-to-image" and got.text["strength"] == "0.7" and got.text["class"] == "8"

    # inpainting: a mask as a data: URL, RePaint jumps; the kept region is the input's
    body = {"class": 0, "seed": 5, "steps": 8, "sampler": "ddpm", "image": "data:image/png;base64," + b64(three),
            "mask": "data:image/png;base64," + b64(png_of(left_mask())), "resample_jumps": 1, "jump_length": 2,
            "mask_blur": 0}
    job = submit(client, **body)
    pngs = job_pngs(client, job["id"])
    assert pngs == expected_edit(pipe, a_three(), 0, [5], mask=left_mask(), steps=8, sampler="ddpm",
                                 resample_jumps=1, jump_length=2, mask_blur=0)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(pngs[0])))[:, 8:], a_three()[:, 8:])
    state = client.get(job["status_url"]).json()
    assert state["edit"]["mode"] == "inpainting" and state["edit"]["strength"] == 1.0
    assert state["steps"] == 8 + 3 * 2  # 8 steps down, and back down after each two-step jump (levels 2, 4, 6)

    # a bigger RGB picture is fitted as the Python API fits it (crop: shorter side, centre cut)
    wide = np.zeros((32, 48, 3), np.uint8)
    wide[:, 8:40] = np.kron(a_three(), np.ones((2, 2), np.uint8))[:, :, None]
    jpeg = png_of(wide, "JPEG", quality=95)
    job = submit(client, **{"class": 3, "seed": 1, "steps": 6, "sampler": "ddim", "image": b64(jpeg), "strength": 0.5})
    assert job_pngs(client, job["id"]) == expected_edit(pipe, jpeg, 3, [1], steps=6, strength=0.5)


def test_compatible_edits_run_as_one_batch_with_the_bytes_they_have_alone(client, pipe, server):
    blocker = submit(client, **{"class": 0, **LONG})
    events_of(client, blocker["id"], until_step=1)  # the blocker runs; the next jobs queue behind it
    pictures = [a_three(), np.rot90(a_three()).copy(), np.fliplr(a_three()).copy()]
    same = {"steps": 10, "sampler": "dpm++2m", "strength": 0.6}
    jobs = [submit(client, **{"class": c, "n": n, "seed": s, "image": b64(png_of(p)), **same})
            for p, (c, n, s) in zip(pictures, ((8, 1, 4), (5, 2, 9), (2, 1, 11)))]
    other = submit(client, **{"class": 8, "seed": 4, "image": b64(png_of(a_three())), **same, "strength": 0.5})
    gen = submit(client, **{"class": 8, "seed": 4, "steps": 10, "sampler": "dpm++2m"})  # a generation: its own batch
    assert client.post(f"/v1/jobs/{blocker['id']}/cancel").json()["status"] == "cancelled"
    for job, p, (c, n, s) in zip(jobs, pictures, ((8, 1, 4), (5, 2, 9), (2, 1, 11))):
        assert job_pngs(client, job["id"]) == expected_edit(pipe, p, c, [s + k for k in range(n)], steps=10,
                                                             sampler="dpm++2m", strength=0.6)
        assert client.get(job["status_url"]).json()["batch_images"] == 4
    assert wait_final(client, other["id"])["batch_images"] == 1  # another strength: not in that batch
    assert wait_final(client, gen["id"])["batch_images"] == 1
    assert job_pngs(client, other["id"]) == expected_edit(pipe, a_three(), 8, [4], steps=10, sampler="dpm++2m",
                                                           strength=0.5)


# -- OpenAI's images.edit ----------------------------------------------------------------------------------------


def test_openai_client_edits_and_inpaints_with_the_python_apis_bytes(server, pipe):
    openai = pytest.importorskip("openai", reason="the official OpenAI client tests need '.[server-test]'")
    oc = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    three = png_of(a_three())
    res = oc.images.edit(image=("three.png", three, "image/png"), prompt="8", n=2, size="16x16",
                         response_format="b64_json", model="digits",
                         extra_body={"seeds": [7, 1], "steps": 10, "sampler": "ddim", "strength": 0.7})
    assert isinstance(res, openai.types.ImagesResponse) and len(res.data) == 2
    assert [base64.b64decode(d.b64_json) for d in res.data] == expected_edit(pipe, a_three(), 8, [7, 1], strength=0.7)
    assert "seed 7" in res.data[0].revised_prompt

    # OpenAI's mask convention: fully transparent = regenerate (here the left half)
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:, :, 3] = 255 - left_mask()
    res = oc.images.edit(image=("three.png", three, "image/png"), mask=("mask.png", png_of(Image.fromarray(rgba)),
                                                                          "image/png"),
                         prompt="class:0", response_format="b64_json",
                         extra_body={"seed": 2, "steps": 8, "sampler": "ddpm", "guidance_interval": [100, 800]})
    got = base64.b64decode(res.data[0].b64_json)
    es = EditSettings().for_mask(True)
    want_img = pipe.inpaint(a_three(), left_mask(), [0], steps=8, sampler="ddpm", seeds=[2],
                            guidance_interval=(100, 800), **es.edit_kwargs(True))[0]
    meta = generation_metadata("digits.tdit", [0], [2], GenerationSettings(steps=8, sampler="ddpm",
                                                                         guidance_interval=(100, 800)))
    meta.update(es.png_items(True))
    assert got == png_bytes(want_img, meta, 0)

    with pytest.raises(openai.BadRequestError) as e:
        oc.images.edit(image=("three.png", b"not a picture", "image/png"), prompt="8", response_format="b64_json")
    assert "not a readable image" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        oc.images.edit(image=("three.png", three, "image/png"), prompt="a cat", response_format="b64_json")
    assert "unknown class name" in str(e.value)


# -- bad uploads ----------------------------------------------------------------------------------------------------


def _bad_pictures():
    i16 = Image.fromarray(np.zeros((16, 16), np.uint16)).convert("I;16")
    return [
        ("not an image", b"hello, not a picture", "not a readable image"),
        ("huge (pixels)", png_of(np.zeros((65, 65), np.uint8)), "more than the 4096 pixels"),
        ("wrong mode (16-bit)", png_of(i16), "mode 'I;16'"),
        ("wrong mode (CMYK)", png_of(Image.new("CMYK", (16, 16)), "JPEG"), "mode 'CMYK'"),
        ("truncated", png_of(a_three())[:60], "not a readable image"),
    ]


BAD_PICTURES = _bad_pictures()


@pytest.mark.parametrize("data,message", [(d, m) for _, d, m in BAD_PICTURES], ids=[n for n, _, _ in BAD_PICTURES])
def test_bad_pictures_are_4xx_on_both_endpoints(client, data, message):
    assert_json_error(client.post("/v1/jobs", json={"class": 8, "image": b64(data)}), 400, message)
    assert_json_error(client.post("/v1/images/edits", files={"image": ("x.png", data, "image/png")},
                                  data={"prompt": "8"}), 400, message)
    # the same picture as a mask of a good one
    good = png_of(a_three())
    assert_json_error(client.post("/v1/jobs", json={"class": 8, "image": b64(good), "mask": b64(data)}), 400,
                      message)


BAD_EDIT_JOBS = [
    ({"image": 12}, "image must be a non-empty string"),
    ({"image": "###"}, "not valid base64"),
    ({"image": "data:image/png,abc"}, "must be base64"),
    ({"mask": "AAAA"}, "belong to an edit job"),
    ({"strength": 0.5}, "belong to an edit job"),
    ({"image": "PNG", "strength": 1.5}, "strength must be a number in [0, 1]"),
    ({"image": "PNG", "strength": "0.5"}, "strength must be"),
    ({"image": "PNG", "strength": float("nan")}, "strength must be"),
    ({"image": "PNG", "resample_jumps": 1}, "needs a mask"),
    ({"image": "PNG", "mask": "PNG", "resample_jumps": -1}, "resample_jumps must be an integer in 0..100"),
    ({"image": "PNG", "mask": "PNG", "jump_length": 0}, "jump_length must be"),
    ({"image": "PNG", "mask": "PNG", "mask_blur": 1e9}, "mask_blur must be"),
    ({"image": "PNG", "fit": "squash"}, "fit must be one of"),
    ({"image": "PNG", "mask": "SMALL"}, "the mask is 8 x 8 but the image is 16 x 16"),
    ({"image": "PNG", "mask": "PNG", "resample_jumps": 100, "steps": 1000}, "more than the 1000"),
]


@pytest.mark.parametrize("fields,message", BAD_EDIT_JOBS, ids=[m for _, m in BAD_EDIT_JOBS])
def test_bad_edit_jobs_are_400_with_a_clear_message(client, fields, message):
    pictures = {"PNG": b64(png_of(a_three())), "SMALL": b64(png_of(np.zeros((8, 8), np.uint8)))}
    body = {"class": 8, **{k: pictures.get(v, v) if isinstance(v, str) else v for k, v in fields.items()}}
    r = client.post("/v1/jobs", content=json.dumps(body), headers={"content-type": "application/json"})
    assert_json_error(r, 400, message)


def test_bad_multipart_edits_are_4xx_with_a_clear_message(client):
    good = png_of(a_three())
    post = lambda files=None, data=None, **kw: client.post("/v1/images/edits", files=files, data=data, **kw)  # noqa: E731
    assert_json_error(post(data={"prompt": "8"}, files={"mask": ("m.png", good, "image/png")}), 400,
                      "missing field 'image'")
    assert_json_error(post(data={"prompt": "8", "image": "a string"}, files={"mask": ("m.png", good, "image/png")}),
                      400, "file part")
    assert_json_error(post(files={"image": ("x.png", good, "image/png")}), 400, "prompt must be")
    assert_json_error(post(files={"image": ("x.png", good, "image/png")}, data={"prompt": "8", "strength": "2"}),
                      400, "strength must be")
    assert_json_error(post(files={"image": ("x.png", good, "image/png")}, data={"prompt": "8", "colour": "red"}),
                      400, "unknown field")
    assert_json_error(post(files={"image": ("x.png", good, "image/png"),
                                  "mask": ("m.png", png_of(np.zeros((8, 8), np.uint8)), "image/png")},
                           data={"prompt": "8"}), 400, "mask is 8 x 8")
    assert_json_error(post(files={"image": ("x.png", good, "image/png")}, data={"prompt": "8", "size": "512x512"}),
                      400, "16x16")
    assert_json_error(post(files={"image": ("x.png", good, "image/png")},
                           data={"prompt": "8", "response_format": "url"}), 400, "b64_json")
    assert_json_error(client.post("/v1/images/edits", json={"prompt": "8"}), 415, "multipart/form-data")
    assert_json_error(client.post("/v1/images/edits", content=b"--x\r\nbroken",
                                  headers={"content-type": "multipart/form-data; boundary=x"}), 400)
    # over the upload limit (200 kB on this server): 413, for a form and for a JSON edit job
    noise = png_of(np.random.default_rng(0).integers(0, 256, (60, 60, 3), dtype=np.uint8)) * 30
    assert_json_error(post(files={"image": ("x.png", noise, "image/png")}, data={"prompt": "8"}), 413, "over")
    assert_json_error(client.post("/v1/jobs", json={"class": 8, "image": b64(noise)}), 413, "over 200000 bytes")
    # a large body without an image stays under the small limit of other requests
    assert_json_error(client.post("/v1/jobs", json={"class": "x" * 20000}), 413, "only an edit job")
    assert client.get("/health").json()["status"] == "ok"


def test_capabilities_say_edits_are_available_and_the_upload_limits(client):
    caps = client.get("/v1/capabilities").json()
    assert caps["edit"] == {"available": True, "modes": ["image-to-image", "inpainting"]}
    assert caps["limits"]["max_upload_bytes"] == 200_000 and caps["limits"]["max_image_pixels"] == 64 * 64
