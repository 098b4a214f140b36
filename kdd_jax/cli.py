"""`kdd` command line. Human text and progress go to stderr; `--json` puts a machine-readable
result on stdout. Exit codes: 0 ok, 1 error (any item failed), 2 usage."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def _eprint(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def _torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def cmd_convert(args) -> int:
    from converters import ConversionError
    from converters.bulk import convert_many, write_summary

    if Path(args.out).exists() and not Path(args.out).is_dir():
        _eprint(f"kdd convert: --out {args.out} exists and is not a directory")
        return EXIT_USAGE
    verify = _torch_available() if args.verify is None else args.verify
    if args.verify and not _torch_available():
        _eprint("kdd convert: --verify needs PyTorch (pip install 'kdd-jax[torch]')")
        return EXIT_ERROR
    if not verify and not args.quiet:
        _eprint("note: verification against PyTorch is off" + ("" if _torch_available() else " (PyTorch not installed)"))
    started = time.perf_counter()

    def on_start(i, n, src):
        if args.quiet:
            return
        elapsed = time.perf_counter() - started
        eta = f", ETA {elapsed / i * (n - i):.0f}s" if i else ""
        _eprint(f"[{i + 1}/{n}] {src.name} <- {src.weights}{eta}")

    outcomes = []
    try:
        for o in convert_many(
            args.sources,
            args.out,
            config=args.config,
            verify=verify,
            allow_pickle=args.allow_pickle,
            overwrite=args.overwrite,
            on_start=on_start,
        ):
            outcomes.append(o)
            if not args.quiet:
                _eprint("    " + _describe(o))
    except ConversionError as e:
        _eprint(f"kdd convert: {e}")
        if args.json:
            print(json.dumps({"command": "convert", "error": str(e), "converted": 0, "students": []}, indent=2))
        return EXIT_ERROR
    Path(args.out).mkdir(parents=True, exist_ok=True)  # every student may have failed before creating it
    write_summary(f"{args.out}/conversion_summary.json", outcomes)
    n_ok = sum(o.status == "ok" for o in outcomes)
    n_skipped = sum(o.status == "skipped" for o in outcomes)
    n_failed = len(outcomes) - n_ok - n_skipped
    if not args.quiet:
        _eprint(_table(outcomes))
        _eprint(f"{n_ok} converted, {n_skipped} already up to date, {n_failed} failed -> {args.out}")
    if args.json:
        print(json.dumps({"command": "convert", "out": str(args.out), "converted": n_ok, "skipped": n_skipped,
                          "failed": n_failed, "students": [dataclasses.asdict(o) for o in outcomes]}, indent=2))
    return EXIT_OK if n_failed == 0 else EXIT_ERROR


def _describe(o) -> str:
    if o.status == "skipped":
        return f"up to date: {o.output} holds these weights converted with this config (--overwrite redoes it)"
    if o.status != "ok":
        return f"FAILED: {o.error}"
    v = o.verification
    check = "not verified" if v is None else (
        f"verified: max logit diff {v['max_abs_logit_diff']:.1e}, input-grad rel. L2 error {v['input_grad_rel_l2']:.1e}"
        + ("" if not v.get("float64_arbiter") else
           f" (float32 ReLU kink flip on {len(v['float64_arbiter']['probes'])} probe(s); float64 agrees to "
           f"{v['float64_arbiter']['max_input_grad_rel_l2']:.0e})")
    )
    inferred = f"; config inferred ({len(o.inferred)} assumptions, see report)" if o.inferred else ""
    return f"ok: {o.family}, {o.parameters:,} params, {o.seconds:.1f}s, {check}{inferred}"


def _table(outcomes) -> str:
    rows = [("student", "status", "family", "detail")]
    for o in outcomes:
        detail = o.output if o.status in ("ok", "skipped") else (o.error or "").splitlines()[0]
        rows.append((o.name, o.status, o.family or "-", detail[:100]))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}" for r in rows)


def _detect_errors() -> tuple:
    from kdd_jax.config import ConfigError
    from kdd_jax.generative.samplers import SamplingError
    from kdd_jax.synthesis import SynthesisError
    from kdd_jax.teachers import QueryBudgetExceeded, TeacherError

    # SamplingError: a diffusion student whose sampling diverges, or a prompt it cannot take
    return (ConfigError, TeacherError, SynthesisError, SamplingError, QueryBudgetExceeded, ValueError, OSError)


def _run_option_error(args) -> str | None:
    """What is wrong with detect / calibrate / audit's numeric options, checked before any model, teacher or
    cache is opened (the libraries check them too, but only once that work is done)."""
    if args.probes is not None and args.probes < 1:
        return f"--probes {args.probes}: the number of probes must be >= 1"
    if args.budget is not None and args.budget < 0:
        return f"--budget {args.budget}: the query budget must be >= 0"
    from kdd_jax.synthesis.probes import SEED_LIMIT

    if not 0 <= args.seed < SEED_LIMIT:
        return f"--seed {args.seed}: seeds are 0 to 2**32 - 1"
    return None


def _detect_config(args):
    from kdd_jax.detect import DetectConfig
    from kdd_jax.synthesis import SynthesisConfig

    from kdd_jax.scores import SCORES

    if args.score is not None and args.score not in SCORES:
        raise ValueError(f"--score {args.score}: not a classifier score; choose from {sorted(SCORES)}")
    sc = SynthesisConfig(method=args.method, n_probes=100 if args.probes is None else args.probes, steps=args.steps,
                         seed=args.seed,
                         restarts=args.restarts, aug_noise=args.aug_noise)
    return DetectConfig(synthesis=sc, score=args.score or "dark_corr")


def _open_teachers(args):
    """Cached teachers from --teachers, restricted to --teacher names if given."""
    from kdd_jax.config import ConfigError
    from kdd_jax.teachers import CachedTeacher, ResponseCache
    from kdd_jax.teachers.config import load_teachers_file, open_teacher

    entries = load_teachers_file(args.teachers)
    if args.teacher:
        known = [e.name for e in entries]
        unknown = [t for t in args.teacher if t not in known]
        if unknown:
            raise ConfigError(f"{args.teachers}: no teacher named {unknown} (--teacher); it has {known}")
        entries = [e for e in entries if e.name in args.teacher]
    cache = ResponseCache(Path(args.cache).expanduser() / "responses.sqlite")
    teachers = [open_teacher(e) for e in entries]
    generative = [t.name for t in teachers if getattr(t, "output", None) == "images"]
    if generative and not getattr(args, "generative", False):
        raise ConfigError(f"{args.teachers}: teacher(s) {generative} answer images (generative); the student is a "
                          "classifier. Detect a diffusion student (a diffusers folder) against them.")
    if getattr(args, "generative", False):
        others = [t.name for t in teachers if t.name not in generative]
        if others:
            raise ConfigError(f"{args.teachers}: teacher(s) {others} are classifiers; a diffusion student needs "
                              "generative teachers (a diffusers folder, or http with output: images)")
        from kdd_jax.teachers.generative import CachedGenerativeTeacher

        return [CachedGenerativeTeacher(t, cache, budget=args.budget) for t in teachers]
    return [CachedTeacher(t, cache, budget=args.budget) for t in teachers]


def _pool(args, config):
    from kdd_jax.synthesis import ImagePool

    return None if not args.pool else ImagePool.from_file(args.pool, config)


def _synthesis_progress(args, steps):
    def progress(step, loss):
        if not args.quiet:
            _eprint(f"  synthesis step {step}/{steps}: loss {loss:.4f}")

    return progress


def _sampling_overrides(args) -> dict:
    return {k: v for k, v in (("num_inference_steps", args.num_inference_steps),
                              ("guidance_scale", args.guidance_scale)) if v is not None}


def _feature_net(args):
    if not args.feature_net:
        if args.lpips_heads:
            raise ValueError("--lpips-heads needs --feature-net (the backbone the heads were trained for)")
        if args.feature_size is not None:
            raise ValueError("--feature-size needs --feature-net (a DINOv2 folder)")
        return None
    from kdd_jax.detect import load_any_student
    from kdd_jax.scores.images import classifier_feature_net, clip_feature_net, load_lpips_heads, vit_feature_net

    from converters.clip_vision import convert_clip_vision, is_clip_folder  # same distribution; no torch
    from converters.transformers_folder import model_type
    from converters.vit import convert_vit, is_vit_folder

    name = Path(args.feature_net).name
    encoder = ("CLIP" if is_clip_folder(args.feature_net) else "ViT/DINO" if is_vit_folder(args.feature_net)
               else None)
    kind = model_type(args.feature_net)
    if encoder is None and kind is not None:  # a transformers folder of a model no port covers
        raise ValueError(f"{Path(args.feature_net) / 'config.json'}: model_type {kind!r} is not a supported "
                         "feature network; supported transformers image encoders: clip, clip_vision_model, vit, "
                         "deit, dinov2, dinov2_with_registers (or give a kdd-jax classifier directory)")
    if encoder:  # a transformers image encoder: one image embedding, no classes
        if args.prompts == "caption":  # refused before the (large) checkpoint is read
            raise ValueError(f"--prompts caption needs a classifier as --feature-net (it names the class of the "
                             f"student's image); a {encoder} folder has no classes")
        if args.score == "neg_lpips":
            raise ValueError(f"--score neg_lpips compares feature maps; a {encoder} folder gives one image embedding: "
                             "use a set score (linear_cka, rbf_cka, acs, neg_mmd2)")
        if args.lpips_heads:
            raise ValueError(f"--lpips-heads weigh a classifier's feature maps for neg_lpips; a {encoder} folder "
                             "gives one image embedding (no heads to weigh)")
        if args.feature_size is not None and (encoder == "CLIP" or not kind.startswith("dinov2")):
            raise ValueError(f"--feature-size: only DINOv2 feature networks take another input size; "
                             f"{args.feature_net} is a {kind} folder")
        convert, build = (convert_clip_vision, clip_feature_net) if encoder == "CLIP" else (convert_vit, vit_feature_net)
        enc = convert(args.feature_net)
        size = {} if args.feature_size is None else {"size": args.feature_size}
        net, classifier = build(enc.model, enc.mean, enc.std, name=name, resize=enc.resize, **size), None
    else:
        if args.feature_size is not None:
            raise ValueError("--feature-size: only DINOv2 feature networks take another input size; "
                             f"{args.feature_net} is a classifier")
        model, config = load_any_student(args.feature_net, what="feature network (--feature-net)")
        net, classifier = classifier_feature_net(model, config, name=name), (model, config)
    if args.lpips_heads:
        net = net.with_heads(load_lpips_heads(args.lpips_heads, net))
    return net, classifier


def _emit_detection(args, report: dict, result, save) -> int:
    """Write the artefacts (with --out), then print the report (--json) or the verdict table."""
    if args.out:
        written = save()
        if not args.quiet:
            _eprint(f"report: {written['report']}")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_verdict_table(result))
    return EXIT_OK


def _all_diffusion(students) -> bool:
    """True when every student found is a diffusers folder; mixing them with classifiers is an error."""
    from kdd_jax.config import ConfigError
    from kdd_jax.generative.pipeline import is_diffusion_folder

    kinds = {isinstance(src, Path) and is_diffusion_folder(src) for _, src in students}
    if len(kinds) > 1:
        raise ConfigError("the students mix diffusion models (diffusers folders) and classifiers; audit them separately")
    return kinds == {True}


def _generative_setup(args):
    """(GenerativeDetectConfig, {feature_net, captioner}) from the detection options."""
    from kdd_jax.generative.detect import SET_SCORES, GenerativeDetectConfig, classifier_captioner, score_names

    net = _feature_net(args)
    score = args.score or "ssim"  # the most accurate at N = 1 and 10 on the diffusion zoo; no feature network
    if score not in score_names():
        raise ValueError(f"--score {score}: not an image score; choose from {score_names()}")
    if (score in SET_SCORES or score == "neg_lpips" or args.prompts == "caption") and net is None:
        raise ValueError(f"--score {score} / --prompts {args.prompts} need --feature-net (a classifier directory, "
                         "e.g. from the classifier zoo)")
    gc = GenerativeDetectConfig(probes=args.prompts, n=10 if args.probes is None else args.probes, seed=args.seed,
                                score=score)
    extra = {"feature_net": None if net is None else net[0],
             "captioner": None if net is None or net[1] is None else classifier_captioner(*net[1])}
    return gc, extra


def cmd_detect_generative(args) -> int:
    """`kdd detect` for a diffusion student: shared-noise probes, image scores."""
    from kdd_jax.calibration import Calibration, feature_net_in_use
    from kdd_jax.generative.detect import detect_generative, save_generative_detection
    from kdd_jax.generative.pipeline import load_diffusion

    args.generative = True
    try:
        gc, extra = _generative_setup(args)
        calibration = Calibration.load(args.calibration) if args.calibration else None
        teachers = _open_teachers(args)
        student = load_diffusion(args.student, _sampling_overrides(args))
        if not args.quiet:
            _eprint(f"student {args.student}: diffusion UNet ({student.scheduler.kind}, "
                    f"{student.sampling.num_inference_steps} steps), {len(teachers)} candidate teacher(s); "
                    f"{gc.n} {gc.probes}-prompt probes, seed {gc.seed}, score {gc.score}")
        result = detect_generative(student, teachers, gc, **extra, calibration=calibration, alpha=args.alpha,
                                   progress=None if args.quiet else (lambda m: _eprint("  " + m)))
    except _detect_errors() as e:
        _eprint(f"kdd detect: {e}")
        if args.json:
            print(json.dumps({"command": "detect", "error": str(e)}, indent=2))
        return EXIT_ERROR
    import dataclasses

    report = {"command": "detect", "kind": "generative", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "student": str(args.student), "teachers_file": str(args.teachers),
              "calibration_file": args.calibration, "feature_net": args.feature_net, "lpips_heads": args.lpips_heads,
              "feature_net_sha256": feature_net_in_use(gc, extra["feature_net"]),  # None when the score reads no network
              "sampling": dataclasses.asdict(student.sampling), **result.to_dict()}
    return _emit_detection(args, report, result, lambda: save_generative_detection(args.out, report, result))


def cmd_detect(args) -> int:
    from kdd_jax.generative.pipeline import is_diffusion_folder

    problem = _run_option_error(args)
    if problem:
        _eprint(f"kdd detect: {problem}")
        return EXIT_ERROR
    if is_diffusion_folder(args.student):
        return cmd_detect_generative(args)
    return cmd_detect_classifier(args)


def cmd_detect_classifier(args) -> int:
    from kdd_jax.calibration import Calibration
    from kdd_jax.config import to_json_dict
    from kdd_jax.detect import check_comparable_answers, detect, load_any_student, save_detection
    from kdd_jax.synthesis import OPTIMISED_METHODS

    calibration = None
    try:
        dc = _detect_config(args)  # settings first: a refused one costs no model or teacher load
        if args.calibration:
            calibration = Calibration.load(args.calibration)
        teachers = _open_teachers(args)
        check_comparable_answers(teachers, dc.score)  # before the student is loaded or converted
        model, config = load_any_student(args.student)
        sc = dc.synthesis
        if not args.quiet:
            _eprint(f"student {args.student}: {config.family}, {len(teachers)} candidate teacher(s); "
                    f"synthesising {sc.n_probes} probes ({sc.method}, "
                    f"{f'{sc.steps} steps, ' if sc.method in OPTIMISED_METHODS else ''}"
                    f"{f'aug-noise {sc.aug_noise:g}, ' if sc.aug_noise else ''}seed {sc.seed})")
        pool = _pool(args, config)
        result = detect(model, config, teachers, dc, _synthesis_progress(args, sc.steps),
                        calibration=calibration, alpha=args.alpha, pool=pool,
                        checkpoint_dir=Path(args.out) / "synthesis-checkpoint" if args.out else None)
    except _detect_errors() as e:
        _eprint(f"kdd detect: {e}")
        if args.json:
            print(json.dumps({"command": "detect", "error": str(e)}, indent=2))
        return EXIT_ERROR
    report = {"command": "detect", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "student": str(args.student), "teachers_file": str(args.teachers),
              "calibration_file": args.calibration, **result.to_dict(), "preprocessing": to_json_dict(config.preprocessing)}
    return _emit_detection(args, report, result, lambda: save_detection(args.out, report, result, calibration))


def cmd_calibrate(args) -> int:
    from kdd_jax.calibration import Calibration, min_references, settings_of
    from kdd_jax.detect import check_comparable_answers, detect, find_students, load_student_source
    from kdd_jax.io import atomic_write_json

    out = Path(args.out)
    partial = out.with_name(out.name + ".partial")
    # where the calibration goes is checked before any reference is scored: a bad --out must not cost the work
    folder = out.parent
    if out.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
        why = ("is a directory" if out.is_dir() else "its folder does not exist" if not folder.is_dir()
               else "its folder is not writable")
        _eprint(f"kdd calibrate: --out {out}: {why}; give a file path (e.g. calibration.json) in a writable folder")
        return EXIT_ERROR
    problem = _run_option_error(args)
    if problem:
        _eprint(f"kdd calibrate: {problem}")
        return EXIT_ERROR
    try:
        refs = find_students(args.references)
        generative = _all_diffusion(refs)
        if generative:
            from kdd_jax.calibration import generative_settings
            from kdd_jax.generative.detect import detect_generative
            from kdd_jax.generative.pipeline import load_diffusion

            args.generative = True
            gc, extra = _generative_setup(args)
            settings = generative_settings(gc, extra["feature_net"])
        if not generative:
            dc = _detect_config(args)
            settings = settings_of(dc)
        teachers = _open_teachers(args)
        if not generative:
            check_comparable_answers(teachers, dc.score)  # once, before any reference is scored
        names = [t.name for t in teachers]
    except _detect_errors() as e:
        _eprint(f"kdd calibrate: {e}")
        return EXIT_ERROR
    done: dict[str, list[float]] = {}
    if partial.exists():  # resume: keep references already scored with these exact settings and teachers
        try:
            prev = json.loads(partial.read_text())
            if prev.get("settings") == settings and prev.get("teachers") == names:
                done = {k: v for k, v in prev["scores"].items() if isinstance(v, list) and len(v) == len(names)}
        except (OSError, ValueError, AttributeError, KeyError):
            done = {}
        if done and not args.quiet:
            _eprint(f"resuming: {len(done)} reference(s) already scored in {partial}")
    failures = {}
    started = time.perf_counter()
    for i, (name, src) in enumerate(refs):
        if name in done:
            continue
        if not args.quiet:
            elapsed = time.perf_counter() - started
            _eprint(f"[{i + 1}/{len(refs)}] reference {name} (elapsed {elapsed:.0f}s)")
        try:
            if generative:
                result = detect_generative(load_diffusion(src, _sampling_overrides(args), name=name), teachers, gc,
                                           **extra)
            else:
                model, config = load_student_source(src)
                result = detect(model, config, teachers, dc, _synthesis_progress(args, dc.synthesis.steps),
                                pool=_pool(args, config))
        except _detect_errors() as e:
            _eprint(f"  FAILED: {e}")
            failures[name] = str(e)
            continue
        done[name] = result.verdict.scores
        atomic_write_json(partial, {"settings": settings, "teachers": names, "scores": done})
    if failures:
        _eprint(f"kdd calibrate: {len(failures)} reference(s) failed: {sorted(failures)}; the {len(done)} scored "
                f"are kept in {partial}: fix or drop the failing references and re-run (nothing is recomputed)")
        if args.json:
            print(json.dumps({"command": "calibrate", "out": None, "scored": sorted(done), "failed": failures}, indent=2))
        return EXIT_ERROR
    order = [n for n, _ in refs]
    cal = Calibration(names, order, [done[n] for n in order], settings)
    cal.save(out)
    partial.unlink(missing_ok=True)
    need = min_references(len(names), 0.05)
    if not args.quiet:
        _eprint(f"{len(order)} reference(s) scored against {len(names)} teacher(s) -> {out}")
        if len(order) < need:
            _eprint(f"note: with {len(order)} references and {len(names)} candidates no student can be flagged at "
                    f"level 0.05 (at least {need} references are needed)")
    if args.json:
        print(json.dumps({"command": "calibrate", "out": str(out), "references": order, "failed": {}}, indent=2))
    return EXIT_OK


def cmd_audit(args) -> int:
    import contextlib

    from kdd_jax.audit import AuditError, distributed_requested, stdout_to_stderr

    problem = _run_option_error(args)
    if problem:
        _eprint(f"kdd audit: {problem}")
        return EXIT_ERROR
    multi = distributed_requested(args.distributed) or bool(args.num_processes)
    with stdout_to_stderr() if multi else contextlib.nullcontext():
        try:
            outcome = _run_audit(args, multi)
        except (AuditError, *_detect_errors()) as e:
            outcome = e
    if isinstance(outcome, Exception):
        _eprint(f"kdd audit: {outcome}")
        if args.json:
            print(json.dumps({"command": "audit", "error": str(outcome)}, indent=2))
        return EXIT_ERROR
    index, summary = outcome
    if index == 0:
        if args.json:
            print(json.dumps({"command": "audit", "out": str(args.out), "students": summary.rows,
                              "failed": summary.failed, "skipped": summary.skipped, "queries": summary.queries},
                             indent=2))
        else:
            print(_audit_table(summary))
            _eprint(f"summary: {Path(args.out) / 'index.html'} (+ summary.json, summary.csv)")
    return EXIT_ERROR if summary.failed else EXIT_OK


def _run_audit(args, multi: bool):
    """(process index, AuditSummary); raises the errors cmd_audit reports."""
    from kdd_jax.audit import audit, global_barrier, init_distributed
    from kdd_jax.calibration import Calibration
    from kdd_jax.detect import find_students

    index, count = init_distributed(args.coordinator, args.num_processes, args.process_id) if multi else (0, 1)
    calibration = Calibration.load(args.calibration) if args.calibration else None
    students = find_students(args.students)
    extra = {}
    if _all_diffusion(students):
        args.generative = True
        dc, extra = _generative_setup(args)
    else:
        dc = _detect_config(args)
    teachers = _open_teachers(args)
    log = None if args.quiet else (lambda m: _eprint(m if count == 1 else f"[process {index}/{count}] {m}"))
    if log:
        log(f"auditing {len(students)} student(s) against {len(teachers)} teacher(s) -> {args.out}")
    summary = audit(students, teachers, dc, args.out, calibration=calibration, alpha=args.alpha,
                    pool_for=(lambda config: _pool(args, config)), resume=args.resume, process_index=index,
                    process_count=count, barrier=global_barrier if count > 1 else None, log=log, **extra)
    return index, summary


def _audit_table(summary) -> str:
    w = max([len("student")] + [len(r["student"]) for r in summary.rows])
    lines = [f"{'student':<{w}}  {'answer':<24} {'margin':>9} {'bootstrap p':>12}"]
    for r in summary.rows:
        lines.append(f"{r['student']:<{w}}  {r['answer']:<24} {r['margin']:>9.4f} {r['p_value']:>12.3g}")
    for name, err in sorted(summary.failed.items()):
        lines.append(f"{name:<{w}}  FAILED: {err}")
    lines.append(f"{len(summary.rows)} finished ({len(summary.skipped)} from an earlier run), {len(summary.failed)} "
                 f"failed; {summary.queries} new teacher queries")
    return "\n".join(lines)


def cmd_demo(args) -> int:
    from kdd_jax.demo import DEMO_ZOO, DemoError, run_demo, verdict_table

    try:
        summary = run_demo(args.out, zoo=args.zoo or DEMO_ZOO, probes=args.probes, steps=args.steps, seed=args.seed,
                           method=args.method, aug_noise=args.aug_noise, quiet=args.quiet)
    except (DemoError, *_detect_errors()) as e:  # AuditError is a ValueError
        _eprint(f"kdd demo: {e}")
        return EXIT_ERROR
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(verdict_table(summary))
    _eprint(f"report: {Path(args.out) / 'index.html'} (one report.html per student under {Path(args.out) / 'students'}"
            "; summary.json, summary.csv)")
    return EXIT_ERROR if summary["failed"] else EXIT_OK


def cmd_serve(args) -> int:
    import os

    from kdd_jax.config import ConfigError
    from kdd_jax.detect import load_any_student
    from kdd_jax.teachers.local import flax_teacher
    from kdd_jax.teachers.server import make_server

    token = None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            _eprint(f"kdd serve: environment variable {args.token_env} (--token-env) is not set or empty")
            return EXIT_USAGE
    from kdd_jax.teachers.server import MAX_READ_TIMEOUT_S

    if args.k < 1 or args.max_request_mb <= 0 or not 0 < args.read_timeout <= MAX_READ_TIMEOUT_S:
        _eprint(f"kdd serve: --k must be >= 1, --max-request-mb > 0 and --read-timeout in (0, {MAX_READ_TIMEOUT_S:g}] seconds")
        return EXIT_USAGE
    if not 0 <= args.port <= 65535:
        _eprint(f"kdd serve: --port {args.port}: a TCP port is 0-65535 (0: any free port)")
        return EXIT_USAGE
    name = args.name or Path(args.model_dir).resolve().name
    try:
        from kdd_jax.generative.pipeline import is_diffusion_folder

        if is_diffusion_folder(args.model_dir):
            from kdd_jax.generative.pipeline import load_diffusion
            from kdd_jax.teachers.generative import DiffusionTeacher

            teacher = DiffusionTeacher(load_diffusion(args.model_dir, _sampling_overrides(args), name=name))
            what = f"diffusion UNet, {teacher.model.sampling.num_inference_steps} {teacher.model.scheduler.kind} steps, images"
        else:
            model, config = load_any_student(args.model_dir, what="model")
            teacher = flax_teacher(name, model, config, output=args.output, k=args.k)
            what = f"{config.family}, {args.output}"
    except (ConfigError, ValueError, OSError) as e:
        _eprint(f"kdd serve: {e}")
        return EXIT_ERROR
    try:
        server = make_server(teacher, name=name, host=args.host, port=args.port, token=token,
                             max_request_bytes=int(args.max_request_mb * 2**20), read_timeout_s=args.read_timeout,
                             verbose=not args.quiet)
    except OSError as e:  # the bind: a port in use or an unknown host, which the error alone does not name
        _eprint(f"kdd serve: cannot listen on {args.host}:{args.port}: {e}")
        return EXIT_ERROR
    except (ConfigError, ValueError) as e:
        _eprint(f"kdd serve: {e}")
        return EXIT_ERROR
    if args.host not in ("127.0.0.1", "localhost", "::1") and token is None:
        _eprint(f"warning: serving on {args.host} without a token: anyone who can reach it can query the model")
    _eprint(f"serving {name!r} ({what}) at {server.url}/v2/models/{name} "
            f"(auth: {'bearer token' if token else 'none'}); Ctrl-C stops")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        _eprint("stopped")
    finally:
        server.server_close()
    return EXIT_OK


def _verdict_table(result) -> str:
    v = result.verdict
    lines = [f"{'teacher':<24} {'score':>10} {'95% interval':>24} {'queries':>8} {'cached':>7}"]
    for name, score, (lo, hi) in sorted(zip(v.teachers, v.scores, v.intervals), key=lambda r: -r[1]):
        st = result.teacher_stats[name]
        mark = " <- most likely teacher" if name == v.winner else ""
        lines.append(f"{name:<24} {score:>10.4f} {f'[{lo:.4f}, {hi:.4f}]':>24} {st.get('queries', 0):>8} {st.get('hits', 0):>7}{mark}")
    if v.runner_up is not None:
        lines.append(f"winner {v.winner!r} beats {v.runner_up!r} by {v.margin:.4f} (bootstrap p = {v.p_value:.3g}, "
                     f"{v.n_probes} probes, {result.config.score})")
    n = getattr(result, "none", None)
    if n is not None:
        few = (f"; too few references: {n.min_references} needed to ever flag at this level"
               if n.n_references < n.min_references else "")
        lines.append(f"none-of-the-candidates test ({n.n_references} independent references): p = {n.p_none:.3g} "
                     f"at level {n.alpha}{few}")
    else:
        lines.append("not calibrated (--calibration): cannot answer 'none of the candidates'")
    lines.append(f"answer: {result.answer}")
    if hasattr(result, "probes"):
        lines.append(f"probe set sha256 {result.probes.sha256[:16]}..., seed {result.config.synthesis.seed}")
    else:
        lines.append(f"{len(result.request)} {result.config.probes}-prompt probes from noise seeds of seed {result.config.seed}")
    return "\n".join(lines)


def _add_detection_options(p) -> None:
    """Options shared by detect and calibrate: a calibration is only valid for the settings it was made with."""
    from kdd_jax.scores import SCORES
    from kdd_jax.synthesis import METHODS

    p.add_argument("--teachers", required=True, help="teachers file (.json or .yaml)")
    p.add_argument("--teacher", action="append", metavar="NAME",
                   help="use only this teacher from the file (repeatable; one teacher: binary mode)")
    p.add_argument("--probes", type=int, default=None, help="number of probes N (default 100; 10 for a diffusion student)")
    p.add_argument("--steps", type=int, default=200, help="synthesis optimisation steps of pixel, confidence and "
                   "generator (default 200); noise and the pool methods optimise nothing and refuse another value")
    p.add_argument("--method", default="pixel", choices=sorted(METHODS), help="synthesis method (default pixel)")
    p.add_argument("--restarts", type=int, default=1, help="pixel/confidence: independent probe groups optimised in parallel")
    p.add_argument("--aug-noise", type=float, default=None, metavar="S",
                   help="pixel/confidence: std of Gaussian noise (normalised units) on the probes the student sees at "
                        "each step; generator: on its training batches. The class evidence must survive it (default "
                        "1.0 for pixel, the best data-free setting measured; 0, none, for confidence and generator; "
                        "--aug-noise 0 gives pixel probes as before it became the default)")
    from kdd_jax.generative.detect import score_names

    p.add_argument("--score", default=None, choices=sorted(set(SCORES) | set(score_names())),
                   help="agreement score (classifiers: default dark_corr; neg_kl is the paper's KL; label-only teachers "
                        "need top1. Diffusion students: default ssim; also neg_pixel_mse, resid_corr, neg_lpips and the "
                        "set scores linear_cka, rbf_cka, acs, neg_mmd2 on --feature-net features)")
    p.add_argument("--seed", type=int, default=0, help="fixes the probes and the verdict (default 0; 0 to 2**32 - 1)")
    p.add_argument("--cache", default="~/.cache/kdd-jax", help="response cache directory (default ~/.cache/kdd-jax)")
    p.add_argument("--budget", type=int, default=None, help="most new teacher queries this run may send, per teacher")
    p.add_argument("--pool", metavar="FILE", help="real images for the methods real/ood/mia (.safetensors/.npz with "
                   "'images' [N,C,H,W] and optional 'labels', or .npy; uint8 or floats in the student's value range)")
    g = p.add_argument_group("diffusion students (a diffusers folder: unet/ + scheduler/)")
    g.add_argument("--prompts", default="empty", choices=["empty", "caption", "random"],
                   help="probe prompts given with the shared noise: empty (the paper's; default), caption (the class "
                        "--feature-net assigns to the student's empty-prompt image), random (a random class)")
    g.add_argument("--feature-net", metavar="DIR", help="classifier directory whose features (BatchNorm outputs; an "
                   "AlexNet's five ReLU outputs) drive neg_lpips, the set scores and caption prompts; or a transformers "
                   "CLIP, ViT (DINO), DeiT or DINOv2 folder (image embeddings for the set scores)")
    g.add_argument("--feature-size", type=int, metavar="N", help="a DINOv2 --feature-net embeds images resized to NxN "
                   "(position embeddings interpolated) instead of its checkpoint's image_size, e.g. 224, the released "
                   "processors' crop: 8.5x faster than 518 for ViT-S/14 on CPU; part of the network's fingerprint")
    g.add_argument("--lpips-heads", metavar="FILE", help="learned LPIPS heads for --feature-net (.safetensors; LPIPS' "
                   "own key names accepted, e.g. its alex.pth converted: examples/feature_nets/README.md)")
    g.add_argument("--num-inference-steps", type=int, help="the student's sampling steps (default: its "
                   "kdd_sampling.json, else 50)")
    g.add_argument("--guidance-scale", type=float, help="the student's guidance scale for class prompts")


def build_parser() -> argparse.ArgumentParser:
    from kdd_jax import __version__

    parser = argparse.ArgumentParser(prog="kdd", description="Knowledge distillation detection for open-weights models.")
    parser.add_argument("--version", action="version", version=f"kdd-jax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "convert",
        help="convert PyTorch safetensors students into Flax checkpoints",
        description="Convert students (model.safetensors + config.json directories, .safetensors files, "
        "or directories of many students) into orbax checkpoints with a conversion report each.",
    )
    p.add_argument("sources", nargs="+", metavar="SRC", help="file, student directory, or directory of students")
    p.add_argument("--out", required=True, help="output directory; each student goes to OUT/<name>")
    p.add_argument("--config", help="config.json to use for every SRC (overrides their own)")
    v = p.add_mutually_exclusive_group()
    v.add_argument("--verify", dest="verify", action="store_true", default=None,
                   help="compare with the PyTorch reference (default: on when torch is importable)")
    v.add_argument("--no-verify", dest="verify", action="store_false")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also read pickle checkpoints (.bin/.pt/.pth) with torch.load(weights_only=True)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_convert)

    d = sub.add_parser(
        "detect",
        help="name the most likely teacher of one student",
        description="Synthesise probes from the student alone, query every candidate teacher (through the "
        "response cache), score agreement and print the verdict.",
    )
    d.add_argument("--student", required=True, help="student directory (kdd convert output or model.safetensors + config.json)")
    _add_detection_options(d)
    d.add_argument("--calibration", help="calibration file from `kdd calibrate`: enables the 'none of the candidates' "
                   "answer (and binary mode with one --teacher)")
    d.add_argument("--alpha", type=float, default=0.05,
                   help="level of the none-of-the-candidates test: its false-positive rate bound (default 0.05)")
    d.add_argument("--out", help="write verdict.json, report.html and probes.safetensors here; synthesis "
                   "checkpoints go here too, so an interrupted run resumes")
    d.add_argument("--json", action="store_true", help="print the full result as JSON on stdout")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    d.set_defaults(func=cmd_detect)

    c = sub.add_parser(
        "calibrate",
        help="score independent reference students to enable 'none of the candidates'",
        description="Run the detection pipeline on reference students known NOT to be distilled from any "
        "candidate, with exactly the settings later audits will use, and store their scores per teacher "
        "(the null distribution for `kdd detect --calibration`). Resumable: references already scored are kept "
        "in OUT.partial and skipped on re-run.",
    )
    c.add_argument("--references", nargs="+", required=True, metavar="PATH",
                   help="reference students: kdd convert outputs, student directories, or folders of either")
    _add_detection_options(c)
    c.add_argument("--out", required=True, help="calibration file to write (JSON)")
    c.add_argument("--json", action="store_true", help="print a summary as JSON on stdout")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    c.set_defaults(func=cmd_calibrate)

    a = sub.add_parser(
        "audit",
        help="detect the teacher of many students; resumable, multi-process",
        description="Run the detection for every student (kdd convert outputs, student directories, or folders of "
        "either) against the same teachers, sharing the response cache. Writes OUT/students/<name>/ (verdict.json, "
        "report.html, probes.safetensors) and OUT/summary.json, summary.csv, index.html. With --resume, finished "
        "students are skipped and an interrupted synthesis resumes. Exit status 1 if any student failed.",
    )
    a.add_argument("--students", nargs="+", required=True, metavar="PATH",
                   help="students: kdd convert outputs, student directories, or folders of either")
    _add_detection_options(a)
    a.add_argument("--out", required=True, help="output folder")
    a.add_argument("--resume", action="store_true", help="continue an audit in --out (skip finished students)")
    a.add_argument("--calibration", help="calibration file from `kdd calibrate` (enables 'none of the candidates')")
    a.add_argument("--alpha", type=float, default=0.05, help="level of the none-of-the-candidates test (default 0.05)")
    a.add_argument("--distributed", action="store_true",
                   help="join JAX's multi-process runtime (TPU pods, Slurm, Open MPI auto-detected; or set "
                   "KDD_DISTRIBUTED=1): students are split across processes, process 0 writes the summary")
    a.add_argument("--coordinator", help="host:port of process 0 (explicit multi-process set-up, e.g. on one machine)")
    a.add_argument("--num-processes", type=int, help="number of processes (with --coordinator)")
    a.add_argument("--process-id", type=int, help="this process's index (with --coordinator)")
    a.add_argument("--json", action="store_true", help="print the summary as JSON on stdout (process 0)")
    a.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    a.set_defaults(func=cmd_audit)

    from kdd_jax.synthesis import METHODS

    dm = sub.add_parser(
        "demo",
        help="audit the bundled zoo end to end (nothing downloaded, no GPU)",
        description="Serve the bundled Fashion-MNIST teachers over HTTP on loopback (kdd serve), detect the "
        "teacher of every bundled student through the response cache, print the verdict table and write reports.",
    )
    dm.add_argument("--out", default="runs/demo", help="report directory (default runs/demo)")
    dm.add_argument("--probes", type=int, default=64, help="probes per student (default 64)")
    dm.add_argument("--steps", type=int, help="synthesis steps of the data-free optimised methods pixel, confidence "
                    "and generator (default 60); the pool methods and noise optimise nothing and refuse it")
    dm.add_argument("--method", default="mia", choices=sorted(METHODS),
                    help="probe method (default mia: filter the zoo's unlabelled image pool; pixel: data-free)")
    dm.add_argument("--aug-noise", type=float, default=None, metavar="S",
                    help="pixel/confidence/generator: noise std on what the student sees while synthesising (as kdd "
                    "detect; default 1.0 for pixel, 0 for the others; --aug-noise 0: pixel probes without noise)")
    dm.add_argument("--seed", type=int, default=0, help="fixes probes and verdicts (default 0)")
    dm.add_argument("--zoo", help="another demo zoo directory (default: the bundled one)")
    dm.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    dm.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    dm.set_defaults(func=cmd_demo)

    sv = sub.add_parser(
        "serve",
        help="serve a model over the Open Inference Protocol (KServe v2)",
        description="Serve a converted model (or student-format directory) as an Open Inference Protocol v2 "
        "model: GET /v2/health/ready, GET /v2/models/NAME, POST /v2/models/NAME/infer. Inputs are FP32 "
        "[n, C, H, W] raw pixels in the model's value range. A diffusers folder (unet/ + scheduler/) is served as a "
        "generative model: prompt BYTES [n] + noise FP32 [n, C, H, W] or seed INT64 [n] -> images FP32 [n, H, W, C].",
    )
    sv.add_argument("model_dir", metavar="MODEL_DIR", help="kdd convert output, model.safetensors + config.json "
                    "directory, or a diffusers folder")
    sv.add_argument("--port", type=int, required=True, help="TCP port (0: any free port)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    sv.add_argument("--output", default="logits", choices=["logits", "probs", "topk", "labels"],
                    help="what the API answers (default logits)")
    sv.add_argument("--k", type=int, default=5, help="k for --output topk (default 5)")
    sv.add_argument("--num-inference-steps", type=int, help="diffusion folders: sampling steps (default: its "
                    "kdd_sampling.json, else 50)")
    sv.add_argument("--guidance-scale", type=float, help="diffusion folders: guidance scale for class prompts")
    sv.add_argument("--name", help="model name in URLs (default: the directory name)")
    sv.add_argument("--token-env", help="require 'Authorization: Bearer <token>' with the token read from this "
                    "environment variable")
    sv.add_argument("--max-request-mb", type=float, default=64, help="largest request body accepted (default 64 MiB)")
    sv.add_argument("--read-timeout", type=float, default=30.0, help="seconds a request (line, headers, body) may "
                    "take to arrive whole from its first byte, and a connection may idle before one; else it is "
                    "closed (default 30, at most 86400; inference and the answer's write are not counted)")
    sv.add_argument("-q", "--quiet", action="store_true", help="no request log on stderr")
    sv.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with 2 on usage errors
    try:
        return args.func(args)
    except KeyboardInterrupt:
        _eprint("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
