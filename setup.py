"""Build the compiled modules: fastgate._core (shared-memory core) and
fastgate._http (the strict request parser).

Options (env vars, since PEP 517 frontends do not pass build_ext flags):
  FASTGATE_DEBUG=1     annotate + linetrace + -DFASTGATE_DEBUG (counts crossings)
"""
import os

from setuptools import Extension, setup

CYTHON_REQUIRED = "3.3.1"

try:
    import Cython
    from Cython.Build import cythonize
except ImportError as exc:  # pragma: no cover - build environment problem
    raise SystemExit(f"fastgate needs Cython=={CYTHON_REQUIRED} to build: {exc}")

if Cython.__version__ != CYTHON_REQUIRED and not os.environ.get("FASTGATE_ANY_CYTHON"):
    raise SystemExit(
        f"fastgate is built and tested with Cython=={CYTHON_REQUIRED}, found {Cython.__version__}; "
        "set FASTGATE_ANY_CYTHON=1 to build anyway"
    )

debug = bool(os.environ.get("FASTGATE_DEBUG"))
macros = [("FASTGATE_DEBUG", "1"), ("CYTHON_TRACE", "1")] if debug else []

cflags = ["-O2", "-fno-strict-aliasing"] + ([] if debug else ["-DNDEBUG"])
exts = [
    # the shared-memory core: keys, rate counters, CIDR sets
    Extension("fastgate._core", ["fastgate/_core.pyx"], include_dirs=["fastgate/includes"],
              define_macros=macros, extra_compile_args=cflags),
    # the strict HTTP/1.1 request parser (our own; llhttp is only the test oracle)
    Extension("fastgate._http", ["fastgate/_http.pyx"], define_macros=macros, extra_compile_args=cflags),
]

setup(
    ext_modules=cythonize(
        exts,
        language_level=3,
        annotate=debug,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "linetrace": debug,
        },
    )
)
