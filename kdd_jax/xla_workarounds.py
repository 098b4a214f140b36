"""Known XLA miscompiles in the jaxlib this project installs, and the flag that avoids them.

jaxlib 0.10.2 on CPU (the only release installable offline here): XLA:CPU's YNNPACK fusions of a
broadcast multiply-reduce (`sum(a * b)` rewritten as a dot) return wrong values once the fused loop
passes 2**15 rows, silently (jax-ml/jax#39103; the fix is in XNNPACK, not in a released jaxlib that
this project can install). What it did to kdd-jax, measured before this workaround: a score
vmapped over teachers with the student's outputs shared (`jax.vmap(fn, in_axes=(None, 0))`) was wrong
for every probe past row 32768 of the batch: `dark_corr` over 4 teachers x 8193 probes was off by
up to 3.8 on the last teacher (a correlation!), ACS over 40 teachers x 1000 probes by 0.02. The
engine's own paths at default sizes (100 probes, a few teachers, 1000 bootstrap replicates) were
checked and unaffected; large audits and the benchmarks were not safe.

Disabling YNN fusions (`--xla_cpu_experimental_ynn_fusion_type=`) fixes every case measured, and
costs nothing measurable here: pixel synthesis and forward passes of the zoo's four families ran
0-20% faster without them. `apply()` adds the flag to XLA_FLAGS when the installed jaxlib is a known
bad one, unless the user set that option themselves (which is how to opt out; reports record the
value they set). XLA reads XLA_FLAGS when it creates its CPU backend, so this must run before the
first JAX computation: importing kdd_jax does it. If a backend already exists, it warns instead.
XLA aborts the process on a flag it does not know, and XLA_FLAGS is read by every XLA in the
process (and its children): so the flag is not added when a PJRT plugin or libtpu of another
version than jaxlib is installed (a GPU or TPU build from another XLA commit might not know it);
the state then says which, and the user can set the flag by hand. `tests/test_scores.py` checks
the patterns above against per-teacher loops.
"""

from __future__ import annotations

import os
import warnings

KNOWN_BAD_JAXLIB = frozenset({"0.10.2"})
OPTION = "--xla_cpu_experimental_ynn_fusion_type"
FLAG = OPTION + "="

_state: str | None = None


def _jaxlib_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return None


def _foreign_xla() -> list[str]:
    """Installed PJRT plugins / libtpu whose version differs from jaxlib's (they may carry an XLA
    that does not know OPTION)."""
    import importlib.util
    from importlib import metadata

    # PJRT plugins live in the jax_plugins namespace package and libtpu in its own: with neither
    # importable there is nothing to look for, and `import kdd_jax` skips reading the metadata of
    # every installed distribution (35 ms in the dev venv, on every CLI start)
    if importlib.util.find_spec("jax_plugins") is None and importlib.util.find_spec("libtpu") is None:
        return []
    want = _jaxlib_version()
    out = []
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name == "libtpu" or name.startswith("libtpu-") or (name.startswith("jax-") and name.endswith("-plugin")):
            if dist.version != want:
                out.append(f"{name} {dist.version}")
    return sorted(out)


def apply() -> str:
    """Make sure the workaround is in effect where it is needed; returns what was done, recorded in
    reports by kdd_jax.versions: "not needed", "applied", "set by the user (<value>)", "not applied:
    <plugin> installed", or "too late"."""
    global _state
    if _state is not None:
        return _state
    flags = os.environ.get("XLA_FLAGS", "")
    if _jaxlib_version() not in KNOWN_BAD_JAXLIB:
        _state = "not needed"
    elif OPTION in flags:
        _state = "set by the user (" + next(f for f in flags.split() if f.startswith(OPTION)) + ")"
    elif foreign := _foreign_xla():
        _state = f"not applied: {', '.join(foreign)} installed (set XLA_FLAGS={FLAG} by hand if it knows the flag)"
    else:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            _state = "too late"
            warnings.warn(
                f"jaxlib {_jaxlib_version()} miscompiles some CPU reductions (jax-ml/jax#39103) and JAX was "
                f"initialised before kdd_jax could set {FLAG}: import kdd_jax before running any JAX "
                f"computation, or set XLA_FLAGS={FLAG} yourself", RuntimeWarning, stacklevel=3)
        else:
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FLAG).strip()
            _state = "applied"
    return _state
