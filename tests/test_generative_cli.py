"""`kdd detect` / `kdd serve` on diffusion students: diffusers folders written by diffusers itself
(tiny random UNets), teachers in-process and over OIP v2, artefacts on disk."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest

from kdd_jax.cli import main
from kdd_jax.generative.pipeline import is_diffusion_folder, load_diffusion
from kdd_jax.teachers.generative import DiffusionTeacher
from kdd_jax.teachers.server import make_server

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

UNET = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
            norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))


def write_folder(path, seed, *, base=None, steps=3, classes=3):
    """A diffusers folder (unet/, scheduler/, kdd_sampling.json) with a random class-conditional UNet
    (`classes` + the null class); with `base`, base's weights slightly moved."""
    with torch.random.fork_rng():  # leave torch's global generator as it was for other tests
        torch.manual_seed(seed)
        return _write_folder(path, seed, base=base, steps=steps, classes=classes)


def _write_folder(path, seed, *, base, steps, classes):
    unet = diffusers.UNet2DModel(**UNET, num_class_embeds=classes + 1)
    with torch.no_grad():
        if base is not None:  # a "student": the base's weights, slightly moved
            unet.load_state_dict(base.state_dict())
            for p in unet.parameters():
                p.add_(0.02 * (p.std(correction=0) + 1e-3) * torch.randn_like(p))
    unet.save_pretrained(str(path / "unet"), safe_serialization=True)
    diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2").save_pretrained(str(path / "scheduler"))
    names = ["x", "y", "z"] if classes == 3 else None
    (path / "kdd_sampling.json").write_text(json.dumps({"num_inference_steps": steps, **({"class_names": names} if names else {})}))
    return unet


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusion-zoo")
    units = {}
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        (root / name).mkdir()
        units[name] = write_folder(root / name, seed)
    (root / "student").mkdir()
    write_folder(root / "student", 9, base=units["c"])
    return root


def test_diffusers_folders_are_recognised(zoo, tmp_path):
    assert is_diffusion_folder(zoo / "a") and is_diffusion_folder(zoo / "a" / "unet")
    assert not is_diffusion_folder(tmp_path)
    m = load_diffusion(zoo / "a")
    assert m.sampling.num_inference_steps == 3 and m.class_names == ("x", "y", "z") and m.num_classes == 3
    # a diffusers folder whose unet/config.json is broken is still one: loading it names the file (it was
    # taken for a classifier folder and reported as holding no student checkpoints)
    broken = tmp_path / "broken"
    shutil.copytree(zoo / "a", broken)
    (broken / "unet" / "config.json").write_text("{")
    assert is_diffusion_folder(broken)
    with pytest.raises(ValueError, match=rf"{broken / 'unet' / 'config.json'}"):
        load_diffusion(broken)
    (tmp_path / "classifier").mkdir()
    (tmp_path / "classifier" / "config.json").write_text("{")  # a broken top-level config: not claimed
    assert not is_diffusion_folder(tmp_path / "classifier")


def test_kdd_detect_names_the_teacher_of_a_diffusion_student_local_and_over_http(zoo, tmp_path, capsys):
    # teacher c (the true one) answers over HTTP; a and b run in-process
    server = make_server(DiffusionTeacher(load_diffusion(zoo / "c", name="c")), name="c")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        teachers = tmp_path / "teachers.json"
        teachers.write_text(json.dumps({"teachers": [
            {"name": "a", "path": str(zoo / "a")},
            {"name": "b", "path": str(zoo / "b")},
            {"name": "c", "kind": "http", "url": server.url, "output": "images", "noise_shape": [8, 8, 1],
             "image_shape": [8, 8, 1], "send": "seed"},
        ]}))
        out = tmp_path / "out"
        argv = ["detect", "--student", str(zoo / "student"), "--teachers", str(teachers), "--score", "neg_pixel_mse",
                "--probes", "6", "--cache", str(tmp_path / "cache"), "--out", str(out), "--json", "-q"]
        assert main(argv) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["answer"] == "c" and report["kind"] == "generative"
        assert report["probes"]["prompts"] == [""] * 6 and report["sampling"]["num_inference_steps"] == 3
        assert report["teachers"]["c"]["queries"] == 6
        assert {p.name for p in out.iterdir()} >= {"verdict.json", "images.safetensors", "report.html"}
        assert "Images from the same initial noise" in (out / "report.html").read_text()
        from kdd_jax.io import read_safetensors

        arrays, meta = read_safetensors(out / "images.safetensors")
        assert arrays["student"].shape == (6, 8, 8, 1) and set(arrays) >= {"teacher/a", "teacher/b", "teacher/c", "seeds"}
        assert json.loads(meta["prompts"]) == [""] * 6
        # a second run is answered from the cache: no request reaches the server
        before = server.stats["infer_requests"]
        assert main(argv + ["--prompts", "random"]) == 0
        again = json.loads(capsys.readouterr().out)
        assert server.stats["infer_requests"] > before  # new prompts: paid
        before = server.stats["infer_requests"]
        assert main(argv + ["--prompts", "random"]) == 0
        assert json.loads(capsys.readouterr().out)["verdict"] == again["verdict"]
        assert server.stats["infer_requests"] == before
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("extra, needle", [
    (["--score", "neg_lpips"], "--feature-net"),
    (["--prompts", "caption", "--score", "ssim"], "--feature-net"),
    (["--score", "dark_corr"], "not an image score"),
])
def test_kdd_detect_diffusion_student_usage_errors(zoo, tmp_path, capsys, extra, needle):
    teachers = tmp_path / "teachers.json"
    teachers.write_text(json.dumps({"teachers": [{"name": "a", "path": str(zoo / "a")}]}))
    assert main(["detect", "--student", str(zoo / "student"), "--teachers", str(teachers), "--cache",
                 str(tmp_path / "cache"), "-q", *extra]) == 1
    assert needle in capsys.readouterr().err


def test_mixing_classifier_and_generative_teachers_is_refused(zoo, tmp_path, capsys):
    teachers = tmp_path / "teachers.json"
    teachers.write_text(json.dumps({"teachers": [
        {"name": "a", "path": str(zoo / "a")},
        {"name": "k", "kind": "http", "url": "http://127.0.0.1:9", "input_size": [8, 8], "channels": 1, "num_classes": 3},
    ]}))
    assert main(["detect", "--student", str(zoo / "student"), "--teachers", str(teachers), "--score", "ssim",
                 "--cache", str(tmp_path / "cache"), "-q"]) == 1
    assert "are classifiers" in capsys.readouterr().err


def test_kdd_audit_of_diffusion_students_resumes_and_refuses_classifier_teachers(zoo, tmp_path, capsys, make_student):
    students = tmp_path / "students"
    students.mkdir()
    for name in ("student", "a"):  # teacher a's own weights audited as a "student": the closest is a itself
        (students / name).symlink_to(zoo / name, target_is_directory=True)
    teachers = tmp_path / "teachers.json"
    teachers.write_text(json.dumps({"teachers": [{"name": n, "path": str(zoo / n)} for n in ("a", "b", "c")]}))
    argv = ["audit", "--students", str(students), "--teachers", str(teachers), "--score", "neg_pixel_mse",
            "--probes", "4", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "audit"), "--json", "-q"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {r["student"]: r["answer"] for r in doc["students"]} == {"student": "c", "a": "a"}
    rec = json.loads((tmp_path / "audit" / "students" / "student" / "verdict.json").read_text())
    assert rec["kind"] == "generative" and rec["audit_settings"]["generative.score"] == "neg_pixel_mse"
    assert (tmp_path / "audit" / "students" / "student" / "images.safetensors").is_file()
    assert main(argv + ["--resume"]) == 0
    assert sorted(json.loads(capsys.readouterr().out)["skipped"]) == ["a", "student"]
    # a feature network the score does not read changes nothing: still resumable
    assert main(argv + ["--resume", "--feature-net", str(make_student("alexnet_small"))]) == 0
    assert sorted(json.loads(capsys.readouterr().out)["skipped"]) == ["a", "student"]
    # another score in the same folder is refused, naming the setting
    assert main([*argv[:5], "--score", "ssim", *argv[7:], "--resume"]) == 1
    assert "generative.score" in capsys.readouterr().err


def test_kdd_calibrate_then_detect_answers_none_of_the_candidates_for_diffusion_students(zoo, tmp_path, capsys):
    refs = tmp_path / "refs"
    for i in range(3):  # independent references: random UNets of their own
        (refs / f"ref{i}").mkdir(parents=True)
        write_folder(refs / f"ref{i}", 30 + i)
    teachers = tmp_path / "teachers.json"
    teachers.write_text(json.dumps({"teachers": [{"name": n, "path": str(zoo / n)} for n in ("a", "b", "c")]}))
    common = ["--teachers", str(teachers), "--score", "neg_pixel_mse", "--probes", "4", "--cache", str(tmp_path / "cache"),
              "-q"]
    cal = tmp_path / "cal.json"
    assert main(["calibrate", "--references", str(refs), "--out", str(cal), *common]) == 0
    doc = json.loads(cal.read_text())
    assert doc["settings"] == {"kind": "generative", "generative.probes": "empty", "generative.n": 4,
                               "generative.score": "neg_pixel_mse", "generative.feature_net": None}
    assert len(doc["scores"]) == 3 and len(doc["scores"][0]) == 3
    # 3 references, 3 candidates: p >= 3 / 4 for anyone, so the answer is "none of the candidates", and it says why
    assert main(["detect", "--student", str(zoo / "student"), "--calibration", str(cal), "--json", *common]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["answer"] == "none of the candidates" and report["verdict"]["winner"] == "c"
    assert report["none_of_the_candidates"]["min_references"] > 3
    # a calibration made with other settings is refused before any work, naming the field
    assert main(["detect", "--student", str(zoo / "student"), "--calibration", str(cal),
                 *[a if a != "neg_pixel_mse" else "ssim" for a in common]]) == 1
    assert "generative.score" in capsys.readouterr().err


def test_an_alexnet_lpips_feature_net_drives_neg_lpips_and_binds_calibrations(zoo, tmp_path, capsys, make_student):
    """--feature-net on a (tiny, random) torchvision-layout AlexNet with --lpips-heads: the detection
    runs on its ReLU features, the report names the heads and the network's fingerprint, and a
    calibration made with the heads is refused without them (other heads are another score)."""
    from safetensors.numpy import save_file

    alex = make_student("alexnet_small", seed=1)
    heads = tmp_path / "alex.safetensors"
    rng = np.random.default_rng(0)
    save_file({f"lin{i}.model.1.weight": rng.uniform(0, 1, (1, c, 1, 1)).astype(np.float32)
               for i, c in enumerate((8, 16, 24, 16, 16))}, str(heads))
    refs = tmp_path / "refs"
    for i in range(2):
        (refs / f"ref{i}").mkdir(parents=True)
        write_folder(refs / f"ref{i}", 50 + i)
    teachers = tmp_path / "teachers.json"
    teachers.write_text(json.dumps({"teachers": [{"name": n, "path": str(zoo / n)} for n in ("a", "c")]}))
    common = ["--teachers", str(teachers), "--score", "neg_lpips", "--probes", "3", "--cache", str(tmp_path / "cache"),
              "--feature-net", str(alex), "-q"]
    cal = tmp_path / "cal.json"
    assert main(["calibrate", "--references", str(refs), "--out", str(cal), *common, "--lpips-heads", str(heads)]) == 0
    fingerprint = json.loads(cal.read_text())["settings"]["generative.feature_net"]
    assert isinstance(fingerprint, str) and len(fingerprint) == 64
    detect = ["detect", "--student", str(zoo / "student"), "--calibration", str(cal), "--json", *common]
    assert main([*detect, "--lpips-heads", str(heads)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["lpips_heads"] == str(heads) and report["feature_net_sha256"] == fingerprint
    assert report["verdict"]["winner"] in ("a", "c")
    assert main(detect) == 1  # the same backbone without the heads
    assert "generative.feature_net" in capsys.readouterr().err
    assert main(["detect", "--student", str(zoo / "student"), "--teachers", str(teachers), "--lpips-heads", str(heads),
                 "--cache", str(tmp_path / "cache"), "-q"]) == 1
    assert "--lpips-heads needs --feature-net" in capsys.readouterr().err


@pytest.mark.parametrize("encoder", ["CLIP", "ViT/DINO"])
def test_an_image_encoder_folder_as_feature_net_drives_the_set_scores(zoo, tmp_path, capsys, encoder):
    """--feature-net on a transformers CLIP or DINO (ViTModel) folder (tiny, random): the set scores
    compare its image embeddings; caption prompts, which need classes, and neg_lpips, which needs
    feature maps, are refused with a reason."""
    from tests.test_clip_vision import write_clip
    from tests.test_vit import write_vit

    (write_clip if encoder == "CLIP" else write_vit)(tmp_path / "enc")
    teachers = tmp_path / "teachers.json"
    teachers.write_text(json.dumps({"teachers": [{"name": n, "path": str(zoo / n)} for n in ("a", "c")]}))
    argv = ["detect", "--student", str(zoo / "student"), "--teachers", str(teachers), "--score", "linear_cka",
            "--probes", "4", "--cache", str(tmp_path / "cache"), "--feature-net", str(tmp_path / "enc"), "--json", "-q"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["feature_net"] == str(tmp_path / "enc") and len(report["feature_net_sha256"]) == 64
    assert report["verdict"]["teachers"] == ["a", "c"] and report["config"]["score"] == "linear_cka"
    scores = report["verdict"]["scores"]  # linear CKA of the two sets of 4 image embeddings
    assert all(np.isfinite(scores)) and all(-1e-6 <= x <= 1 + 1e-6 for x in scores)
    assert main([*argv, "--prompts", "caption"]) == 1
    assert f"{encoder} folder has no classes" in capsys.readouterr().err
    assert main([*argv[:5], "--score", "neg_lpips", *argv[7:]]) == 1
    assert "use a set score" in capsys.readouterr().err
    assert main([*argv, "--lpips-heads", str(tmp_path / "heads.safetensors")]) == 1
    assert "no heads to weigh" in capsys.readouterr().err
    (tmp_path / "reg").mkdir()  # a transformers folder no port covers: named, not misread as a classifier
    (tmp_path / "reg" / "config.json").write_text(json.dumps({"model_type": "swin"}))
    assert main([*argv[:-3], str(tmp_path / "reg"), "--json", "-q"]) == 1
    assert "model_type 'swin' is not a supported feature network" in capsys.readouterr().err
    # --feature-size belongs to DINOv2 folders: refused for this one (and without --feature-net)
    assert main([*argv, "--feature-size", "16"]) == 1
    assert "--feature-size: only DINOv2 feature networks take another input size" in capsys.readouterr().err
    assert main([*argv[:-4], "--feature-size", "16", "-q"]) == 1
    assert "--feature-size needs --feature-net" in capsys.readouterr().err


def test_a_dinov2_feature_net_at_another_size_is_another_network(zoo, tmp_path, capsys):
    """--feature-size N: the DINOv2 folder embeds at N x N, recorded in the network's fingerprint, so a
    detection at another size gives other scores and is told apart by calibrations."""
    from tests.test_vit import write_vit

    write_vit(tmp_path / "d2", "dinov2")
    teachers = tmp_path / "teachers.json"
    teachers.write_text(json.dumps({"teachers": [{"name": n, "path": str(zoo / n)} for n in ("a", "c")]}))
    argv = ["detect", "--student", str(zoo / "student"), "--teachers", str(teachers), "--score", "linear_cka",
            "--probes", "4", "--cache", str(tmp_path / "cache"), "--feature-net", str(tmp_path / "d2"), "--json", "-q"]
    reports = []
    for extra in ([], ["--feature-size", "20"]):
        assert main([*argv, *extra]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    assert reports[0]["feature_net_sha256"] != reports[1]["feature_net_sha256"]
    assert reports[0]["verdict"]["scores"] != reports[1]["verdict"]["scores"]


def test_classifier_and_generative_calibrations_are_not_interchangeable(tmp_path):
    from kdd_jax.calibration import Calibration, CalibrationError, generative_settings
    from kdd_jax.generative.detect import GenerativeDetectConfig

    classifier_cal = Calibration(["a"], ["r"], [[0.1]], {"score": "dark_corr"})
    with pytest.raises(CalibrationError, match="made for classifier students.*generative"):
        classifier_cal.check_compatible(["a"], generative_settings(GenerativeDetectConfig()))
    gen_cal = Calibration(["a"], ["r"], [[0.1]], generative_settings(GenerativeDetectConfig()))
    with pytest.raises(CalibrationError, match="made for generative students.*classifier"):
        gen_cal.check_compatible(["a"], {"score": "dark_corr"})


def test_a_diverging_diffusion_student_is_a_clear_error(zoo, tmp_path, capsys):
    """Sampling that blows up (weights scaled 1e6, Euler, which never clips) is exit 1 naming the divergence,
    not a traceback."""
    (tmp_path / "wild").mkdir()
    unet = write_folder(tmp_path / "wild", 40)
    with torch.no_grad():
        unet.conv_out.weight.mul_(1e6)
    unet.save_pretrained(str(tmp_path / "wild" / "unet"), safe_serialization=True)
    (tmp_path / "wild" / "kdd_sampling.json").write_text(json.dumps({"num_inference_steps": 3, "scheduler": "euler"}))
    teachers = tmp_path / "teachers.json"
    teachers.write_text(json.dumps({"teachers": [{"name": "a", "path": str(zoo / "a")}]}))
    assert main(["detect", "--student", str(tmp_path / "wild"), "--teachers", str(teachers), "--probes", "2",
                 "--cache", str(tmp_path / "cache"), "-q"]) == 1
    assert "diverged" in capsys.readouterr().err
