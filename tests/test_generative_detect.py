"""Generative teachers (in-process, cached, over OIP v2 with `kdd serve`) and detection of a diffusion
student, on tiny random UNets built in the test (no torch, no files)."""

from __future__ import annotations

import dataclasses
import json
import threading
import urllib.error
import urllib.request

import jax
import numpy as np
import pytest
from flax import nnx

from kdd_jax.generative.detect import GenerativeDetectConfig, detect_generative, make_probes, probe_seeds
from kdd_jax.generative.pipeline import DiffusionModel, SamplingSettings, class_of_prompt
from kdd_jax.generative.samplers import SamplingError
from kdd_jax.generative.schedules import SchedulerConfig
from kdd_jax.models.unet import UNet2DConfig, abstract_unet
from kdd_jax.teachers import ResponseCache, TeacherError
from kdd_jax.teachers.generative import (CachedGenerativeTeacher, CallableGenerativeTeacher, DiffusionTeacher,
                                         GenerationRequest, ImageSpec, generation_key, validate_images)
from kdd_jax.teachers.http import HttpGenerativeTeacher
from kdd_jax.teachers.server import make_server

CLASSES = 3
UNET = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
            norm_num_groups=4, num_class_embeds=CLASSES + 1, down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"))
SHAPE = (8, 8, 1)
FAST = SamplingSettings(num_inference_steps=3)


def random_unet(seed: int, base=None, scale: float = 0.02):
    """A UNet with NumPy-drawn weights (eager Flax init compiles every initialiser: ~50 s on a loaded CI
    core); with `base`, base's weights moved by `scale` x their spread (a "student" of base)."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(abstract_unet(UNet2DConfig(**UNET)) if base is None else base)

    def fill(path, leaf):
        if base is not None:
            p = np.asarray(leaf)
            return p + scale * (p.std() + 1e-3) * rng.standard_normal(p.shape).astype(np.float32)
        if path[-1] == "scale":  # GroupNorm
            return (1 + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
        return (rng.standard_normal(leaf.shape) / np.sqrt(max(fan_in, 1))).astype(np.float32)

    state = nnx.from_flat_state({k: fill(k, v) for k, v in nnx.to_flat_state(state)})
    return nnx.merge(graphdef, state)


def diffusion(name: str, seed: int, *, jitter_from=None, **settings) -> DiffusionModel:
    unet = random_unet(seed, None if jitter_from is None else jitter_from.unet)
    return DiffusionModel(name, unet, SchedulerConfig(kind="ddim"), dataclasses.replace(FAST, **settings),
                          class_names=("shirt", "shoe", "bag"))


@pytest.fixture(scope="module")
def zoo():
    teachers = {n: diffusion(n, s) for n, s in (("a", 1), ("b", 2), ("c", 3))}
    return teachers, diffusion("student-of-b", 7, jitter_from=teachers["b"])


def request(n=4, prompts=None):
    return GenerationRequest.from_seeds(prompts or [""] * n, range(10, 10 + n), SHAPE)


# -- prompts and the model ------------------------------------------------------------------------

def test_prompts_map_to_classes():
    assert class_of_prompt("", 3, None, "m") is None
    assert class_of_prompt(" 2 ", 3, None, "m") == 2
    assert class_of_prompt("Shoe", 3, ("shirt", "shoe", "bag"), "m") == 1
    for bad, needle in (("3", "out of range"), ("a cat", "neither empty"), ("٣", "neither empty")):
        with pytest.raises(SamplingError, match=needle):
            class_of_prompt(bad, 3, ("shirt", "shoe", "bag"), "model 'm'")
    with pytest.raises(SamplingError, match="unconditional"):
        class_of_prompt("1", None, None, "m")


def test_generate_empty_prompt_is_the_unguided_null_class(zoo):
    teachers, _ = zoo
    m = dataclasses.replace(teachers["a"], sampling=SamplingSettings(num_inference_steps=3, guidance_scale=4.0))
    req = request(3)
    got = m.generate(req.prompts, req.noise)
    from kdd_jax.generative import sample, to_unit_range

    want = to_unit_range(sample(m.unet, req.noise, scheduler=m.scheduler, num_inference_steps=3,
                                class_labels=np.full(3, CLASSES), guidance_scale=1.0))
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got.shape == (3, *SHAPE) and 0 <= got.min() and got.max() <= 1
    # a class prompt is guided, and differs from the empty prompt
    mixed = m.generate(["", "bag", "0"], req.noise)
    np.testing.assert_allclose(mixed[0], got[0], atol=1e-5)  # a batch of 1 vs 3: float32 rounding
    guided = to_unit_range(sample(m.unet, req.noise[1:2], scheduler=m.scheduler, num_inference_steps=3,
                                  class_labels=np.asarray([2]), guidance_scale=4.0))
    np.testing.assert_allclose(mixed[1], guided[0], atol=1e-5)
    assert np.abs(mixed[1] - got[1]).max() > 1e-3


def test_stochastic_sampling_needs_seeds(zoo):
    teachers, _ = zoo
    m = dataclasses.replace(teachers["a"], sampling=SamplingSettings(num_inference_steps=3, eta=1.0))
    req = request(2)
    with pytest.raises(SamplingError, match="seeds"):
        m.generate(req.prompts, req.noise)
    a = m.generate(req.prompts, req.noise, req.seeds)
    np.testing.assert_array_equal(a, m.generate(req.prompts, req.noise, req.seeds))


# -- requests, keys, validation -----------------------------------------------------------------------

def test_request_rows_keys_and_seed_recipe():
    req = request(4, ["", "1", "", "bag"])
    sub = req[[3, 0]]
    assert sub.prompts == ("bag", "") and sub.seeds.tolist() == [13, 10]
    np.testing.assert_array_equal(sub.noise, req.noise[[3, 0]])
    keys = req.keys("t")
    assert len(set(keys)) == 4
    assert generation_key("t", "", req.noise[0]) == keys[0]
    assert generation_key("u", "", req.noise[0]) != keys[0]
    assert generation_key("t", "1", req.noise[0]) != keys[0]
    # a request made from seeds and one holding the same tensor share keys (the answer does not depend on how
    # x_T travelled)
    assert GenerationRequest(req.prompts, req.noise.copy()).keys("t") == keys
    with pytest.raises(ValueError, match="noise"):
        GenerationRequest(("",), np.zeros((2, *SHAPE)))


@pytest.mark.parametrize("images, needle", [
    (np.zeros((2, 8, 8, 3)), "shape"),
    (np.full((2, 8, 8, 1), np.nan), "non-finite"),
    (np.full((2, 8, 8, 1), -0.5), r"\[0, 1\]"),
    (np.full((2, 8, 8, 1), 255.0), r"\[0, 1\]"),
])
def test_bad_images_are_refused_naming_the_teacher(images, needle):
    with pytest.raises(TeacherError, match=f"teacher 'remote'.*{needle}"):
        validate_images(images, 2, ImageSpec(SHAPE, SHAPE), "remote")
    ok = validate_images(np.full((2, 8, 8, 1), 1.0005), 2, ImageSpec(SHAPE, SHAPE), "remote")
    assert ok.max() == 1.0


# -- cache --------------------------------------------------------------------------------------------

def test_cached_teacher_pays_each_row_once(zoo, tmp_path):
    teachers, _ = zoo
    inner = DiffusionTeacher(teachers["a"])
    calls = []
    spy = CallableGenerativeTeacher("a", lambda p, x, s: (calls.append(len(p)), inner.generate(GenerationRequest(p, x, s)))[1],
                                    inner.spec)
    cached = CachedGenerativeTeacher(spy, ResponseCache(tmp_path / "c.sqlite"), batch_size=2)
    req = request(5, ["", "1", "", "bag", ""])
    first = cached.generate(req)
    np.testing.assert_allclose(first, inner.generate(req), atol=1e-5)  # batches of 2 vs 5: float32 rounding
    assert cached.stats.queries == 5 and calls == [2, 2, 1]
    again = CachedGenerativeTeacher(spy, ResponseCache(tmp_path / "c.sqlite")).generate(req[[4, 0, 2]])
    np.testing.assert_array_equal(again, first[[4, 0, 2]])
    assert calls == [2, 2, 1]


def test_a_failing_teacher_caches_nothing_wrong_and_keeps_what_it_paid_for(tmp_path):
    spec = ImageSpec(SHAPE, SHAPE)
    answers = iter([np.full((2, *SHAPE), 0.5), np.full((2, *SHAPE), np.nan)])
    bad = CallableGenerativeTeacher("flaky", lambda p, x, s: next(answers), spec)
    cache = ResponseCache(tmp_path / "c.sqlite")
    cached = CachedGenerativeTeacher(bad, cache, batch_size=2)
    with pytest.raises(TeacherError, match="flaky.*non-finite"):
        cached.generate(request(4))
    assert cache.count("flaky") == 2  # the first batch is kept, the NaN batch is not stored
    good = CallableGenerativeTeacher("flaky", lambda p, x, s: np.full((len(p), *SHAPE), 0.25), spec)
    out = CachedGenerativeTeacher(good, cache, batch_size=2).generate(request(4))
    np.testing.assert_array_equal(out[:2], 0.5)
    np.testing.assert_array_equal(out[2:], 0.25)


def test_cache_refuses_answers_of_another_image_size_under_the_same_name(tmp_path):
    cache = ResponseCache(tmp_path / "c.sqlite")
    small = CallableGenerativeTeacher("t", lambda p, x, s: np.zeros((len(p), *SHAPE)), ImageSpec(SHAPE, SHAPE))
    CachedGenerativeTeacher(small, cache).generate(request(2))
    big = CallableGenerativeTeacher("t", lambda p, x, s: np.zeros((len(p), 16, 16, 1)), ImageSpec(SHAPE, (16, 16, 1)))
    with pytest.raises(TeacherError, match="another model under this name"):
        CachedGenerativeTeacher(big, cache).generate(request(2))


# -- over HTTP with kdd serve ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(zoo):
    teachers, _ = zoo
    local = DiffusionTeacher(teachers["b"])
    server = make_server(local, name="b")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield local, server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("send", ["noise", "seed"])
def test_http_generative_teacher_equals_the_in_process_one(served, send):
    local, server = served
    remote = HttpGenerativeTeacher("b", server.url, spec=local.spec, send=send, batch_size=2)
    req = request(5, ["", "shoe", "", "2", ""])
    np.testing.assert_allclose(remote.generate(req), local.generate(req), atol=1e-5)  # served in batches of 2
    assert remote.requests == 3


def post(url, doc):
    req = urllib.request.Request(url, data=json.dumps(doc).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("inputs, needle", [
    ([{"name": "noise", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.0] * 64}], "prompt"),
    ([{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": [""]},
      {"name": "noise", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.0] * 64},
      {"name": "seed", "datatype": "INT64", "shape": [1], "data": [1]}], "exactly one"),
    ([{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": [""]},
      {"name": "noise", "datatype": "FP32", "shape": [1, 1, 4, 4], "data": [0.0] * 16}], "shape"),
    ([{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": [3]},
      {"name": "seed", "datatype": "INT64", "shape": [1], "data": [1]}], "strings"),
    ([{"name": "prompt", "datatype": "BYTES", "shape": [2], "data": ["", ""]},
      {"name": "seed", "datatype": "INT64", "shape": [1], "data": [1]}], "one per prompt"),
    ([{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": [""]},
      {"name": "seed", "datatype": "INT64", "shape": [1], "data": [-1]}], "seeds must be"),
    ([{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["a cat"]},
      {"name": "seed", "datatype": "INT64", "shape": [1], "data": [1]}], "a cat"),
])
def test_serve_answers_400_to_bad_generative_requests(served, inputs, needle):
    _, server = served
    status, doc = post(f"{server.url}/v2/models/b/infer", {"inputs": inputs})
    assert status == 400 and needle in doc["error"]


def test_serve_metadata_describes_the_generative_endpoint(served):
    _, server = served
    with urllib.request.urlopen(f"{server.url}/v2/models/b", timeout=10) as r:
        meta = json.loads(r.read())
    assert {i["name"] for i in meta["inputs"]} == {"prompt", "noise", "seed"}
    assert meta["outputs"][0]["shape"] == [-1, *SHAPE]


def test_http_teacher_answering_out_of_range_images_is_an_error_and_nothing_is_cached(tmp_path):
    spec = ImageSpec(SHAPE, SHAPE)
    wrong = CallableGenerativeTeacher("w", lambda p, x, s: np.full((len(p), *SHAPE), 0.5), spec)
    wrong.generate = lambda req: np.full((len(req), *SHAPE), 2.0)  # a server returning 0..2: skip our own check
    server = make_server(wrong, name="w")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cache = ResponseCache(tmp_path / "c.sqlite")
        remote = CachedGenerativeTeacher(HttpGenerativeTeacher("w", server.url, spec=spec, max_retries=0), cache)
        with pytest.raises(TeacherError, match=r"teacher 'w'.*\[0, 1\]"):
            remote.generate(request(2))
        assert cache.count("w") == 0
    finally:
        server.shutdown()
        server.server_close()


# -- detection ---------------------------------------------------------------------------------------------

def cached_teachers(zoo, tmp_path):
    teachers, _ = zoo
    cache = ResponseCache(tmp_path / "cache.sqlite")
    return [CachedGenerativeTeacher(DiffusionTeacher(m), cache) for m in teachers.values()]


@pytest.mark.parametrize("score", ["neg_pixel_mse", "ssim", "resid_corr"])
def test_detect_names_the_teacher_a_student_was_copied_from(zoo, tmp_path, score):
    _, student = zoo
    gc = GenerativeDetectConfig(n=8, score=score, n_bootstrap=200)
    result = detect_generative(student, cached_teachers(zoo, tmp_path), gc)
    assert result.answer == "b"
    assert result.verdict.p_value < 0.05
    assert result.per_probe.shape == (3, 8)
    assert result.to_dict()["probes"]["seeds"] == probe_seeds(0, 8).tolist()


def test_detect_is_deterministic_and_the_second_run_is_served_from_the_cache(zoo, tmp_path):
    _, student = zoo
    gc = GenerativeDetectConfig(n=4, score="neg_pixel_mse", n_bootstrap=100, probes="random", seed=3)
    teachers = cached_teachers(zoo, tmp_path)
    r1 = detect_generative(student, teachers, gc)
    r2 = detect_generative(student, teachers, gc)
    assert r1.verdict.scores == r2.verdict.scores and r1.request.prompts == r2.request.prompts
    assert all(s["queries"] == 0 and s["hits"] == 4 for s in r2.teacher_stats.values())
    assert all(p in ("0", "1", "2") for p in r1.request.prompts)


def test_caption_probes_use_the_captioner_on_the_students_empty_prompt_images(zoo):
    _, student = zoo
    seen = []

    def captioner(images):
        seen.append(images)
        return ["shoe" if im.mean() > 0.5 else "0" for im in images]

    req = make_probes(student, GenerativeDetectConfig(n=4, probes="caption"), captioner=captioner)
    empty = make_probes(student, GenerativeDetectConfig(n=4))
    np.testing.assert_array_equal(req.noise, empty.noise)
    np.testing.assert_allclose(seen[0], student.generate(empty.prompts, empty.noise), atol=1e-6)
    assert req.prompts == tuple(captioner(seen[0]))
    with pytest.raises(ValueError, match="captioner"):
        make_probes(student, GenerativeDetectConfig(n=4, probes="caption"))


def test_detect_refuses_teachers_that_cannot_share_the_noise(zoo):
    _, student = zoo
    other = CallableGenerativeTeacher("big", lambda p, x, s: np.zeros((len(p), 16, 16, 1)),
                                      ImageSpec((16, 16, 1), (16, 16, 1)))
    with pytest.raises(TeacherError, match="'big'.*same x_T"):
        detect_generative(student, [other], GenerativeDetectConfig(n=2, score="neg_pixel_mse"))
    with pytest.raises(ValueError, match="feature network"):
        detect_generative(student, [DiffusionTeacher(zoo[0]["a"])], GenerativeDetectConfig(n=2, score="neg_lpips"))
    with pytest.raises(ValueError, match="at least 2 candidate teachers"):
        detect_generative(student, [DiffusionTeacher(zoo[0]["a"])], GenerativeDetectConfig(n=2, score="resid_corr"))


@pytest.fixture(scope="module")
def classifier():
    from kdd_jax.config import parse_config
    from tests.test_image_scores import TINY, _random_model

    config = parse_config(TINY)
    return _random_model(config, 1), config


@pytest.mark.parametrize("score", ["neg_lpips", "linear_cka"])
def test_detect_with_a_feature_network_pair_and_set_scores(zoo, tmp_path, classifier, score):
    from kdd_jax.scores.images import classifier_feature_net

    _, student = zoo
    net = classifier_feature_net(*classifier)  # 28x28 classifier, 8x8 images: resized inside
    gc = GenerativeDetectConfig(n=8, score=score, n_bootstrap=200)
    result = detect_generative(student, cached_teachers(zoo, tmp_path), gc, feature_net=net)
    assert result.answer == "b"
    assert (result.per_probe is None) == (score == "linear_cka")


def test_classifier_captioner_gives_the_classifiers_labels(zoo, classifier):
    from kdd_jax.generative.detect import classifier_captioner
    from kdd_jax.models import predict_logits

    model, config = classifier
    _, student = zoo
    req = make_probes(student, GenerativeDetectConfig(n=6, probes="caption"), captioner=classifier_captioner(model, config))
    images = student.generate([""] * 6, req.noise)
    x = jax.image.resize(images, (6, 28, 28, 1), "bilinear") * 255.0
    want = np.asarray(predict_logits(model, (x - 120.0) / 60.0)).argmax(-1)
    assert req.prompts == tuple(str(int(c)) for c in want)
