"""Import FFCV without compiling numba's typed dictionary.

`ffcv.fields.rgb_image` stores its two image-mode constants in a module-level
`numba.typed.Dict`; creating one compiles numba's dictionary implementation,
about 4.5 s of every process's start (FFCV's import: 7.7 s -> 2.9 s here).
FFCV only ever reads that table from Python (`generate_code` copies the ints
into its closures; the writer looks the mode up per image), so a plain dict
behaves the same. The typed Dict is put back right after the import.
"""
import numba.typed

_typed_dict = numba.typed.__dict__.get("Dict")
numba.typed.Dict = dict
try:
    import ffcv.fields.rgb_image  # noqa: F401  (the only FFCV module that builds a typed Dict; imports the rest)
finally:
    if _typed_dict is None:
        del numba.typed.Dict  # numba resolves it lazily again (PEP 562 __getattr__)
    else:
        numba.typed.Dict = _typed_dict
