"""Builds the optional int8 kernel (csrc/int8_matmul.cc) as the library gptjax_int8*.so beside quant.py.

Everything else is in pyproject.toml. The kernel is optional: where it cannot be built (no C++ compiler, no jax to
take XLA's FFI headers from), the install goes on without it and quant.py runs the same int8 model in pure JAX.
"""
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def build_extension(self, ext):
        try:
            import jax.ffi  # the build needs XLA's FFI headers, which jaxlib ships

            ext.include_dirs.append(jax.ffi.include_dir())
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001 - any failure leaves the pure-JAX path, as the docstring says
            print(f"warning: the int8 kernel was not built ({e}); int8 models will run in pure JAX", flush=True)

    def get_export_symbols(self, ext):  # a library loaded with ctypes, not a Python module: no PyInit_ to export
        return []


setup(ext_modules=[Extension("gptjax_int8", ["csrc/int8_matmul.cc"], language="c++", optional=True,
                             extra_compile_args=["-O3", "-std=c++17", "-Wno-psabi"])],
      cmdclass={"build_ext": OptionalBuildExt})
