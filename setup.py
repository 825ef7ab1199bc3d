"""Only the compiled part of the package; everything else is in pyproject.toml.

service._search is the fused search kernel (service/_search.c, see service/search.py); service._ids validates and
converts POST /score's candidate list (service/_ids.c, see service/schemas.py). Both are optional: where they cannot
be built (no C compiler) the install still succeeds, the service searches with search.onnx and validates the
candidates in Python.
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
        Extension("service._ids", ["service/_ids.c"], extra_compile_args=["-O2", "-std=gnu11"], optional=True),
    ]
)
