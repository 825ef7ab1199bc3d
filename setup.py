"""Only the compiled part of the package; everything else is in pyproject.toml.

service._search is the fused search kernel (service/_search.c, see service/search.py). It is optional: where it
cannot be built (no C compiler) the install still succeeds and the service searches with search.onnx.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "service._search",
            ["service/_search.c"],
            depends=["service/_search_kernel.h"],
            extra_compile_args=["-O3", "-std=gnu11", "-Wno-psabi"],
            optional=True,
        ),
    ]
)
