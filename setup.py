"""Build the compiled modules: fastgate._core (shared-memory core) and
fastgate._http (the strict request parser).

Options (env vars, since PEP 517 frontends do not pass build_ext flags):
  FASTGATE_DEBUG=1     annotate + linetrace + -DFASTGATE_DEBUG: the core counts every
                       Python -> core crossing (fastgate.core.crossings()); without it
                       the counters compile to nothing
"""
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

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

# setuptools and cythonize rebuild by timestamps only, so switching between a
# debug and a normal build would silently keep the other variant in place (a
# normal build that still counts and traces, or a "debug" one that counts
# nothing). The mode of the last build is kept in build/; a change forces both.
_HERE = os.path.dirname(os.path.abspath(__file__))
_STAMP = os.path.join(_HERE, "build", "fastgate-debug-mode")
try:
    with open(_STAMP) as f:
        _mode_changed = f.read() != str(int(debug))
except OSError:
    _mode_changed = True


class BuildExt(build_ext):
    def run(self):
        if _mode_changed:
            self.force = True
        super().run()
        os.makedirs(os.path.dirname(_STAMP), exist_ok=True)
        with open(_STAMP, "w") as f:
            f.write(str(int(debug)))


cflags = ["-O2", "-fno-strict-aliasing"] + ([] if debug else ["-DNDEBUG"])
exts = [
    # the shared-memory core: keys, rate counters, CIDR sets
    Extension("fastgate._core", ["fastgate/_core.pyx"], include_dirs=["fastgate/includes"],
              depends=["fastgate/includes/atomics.h", "fastgate/includes/fg_hash.h", "fastgate/includes/fg_debug.h"],
              define_macros=macros, extra_compile_args=cflags),
    # the strict HTTP/1.1 request parser (our own; llhttp is only the test oracle)
    Extension("fastgate._http", ["fastgate/_http.pyx"], define_macros=macros, extra_compile_args=cflags),
]

setup(
    cmdclass={"build_ext": BuildExt},
    ext_modules=cythonize(
        exts,
        force=_mode_changed,
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
