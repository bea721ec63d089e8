"""Arrow schemas of the tables segpipe writes, loaded from the JSON files beside this module."""

import json
import re
from functools import cache
from importlib import resources

import pyarrow as pa

_SCALARS = {
    "bool": pa.bool_(),
    "uint8": pa.uint8(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "string": pa.string(),
    "binary": pa.binary(),
}
_FIXED_LIST = re.compile(r"fixed_size_list<(\w+)>\[(\d+)\]")
_LIST = re.compile(r"list<(.+)>")


def _arrow_type(spec: str) -> pa.DataType:
    if spec in _SCALARS:
        return _SCALARS[spec]
    if match := _FIXED_LIST.fullmatch(spec):
        return pa.list_(_SCALARS[match[1]], int(match[2]))
    if match := _LIST.fullmatch(spec):
        return pa.list_(_arrow_type(match[1]))
    raise ValueError(f"unknown type {spec!r} in a schema file")


@cache
def arrow_schema(name: str) -> pa.Schema:
    """The Arrow schema described by `schemas/<name>.json`, field docs kept as field metadata."""
    spec = json.loads(resources.files(__name__).joinpath(f"{name}.json").read_text())
    fields = [
        pa.field(f["name"], _arrow_type(f["type"]), nullable=f["nullable"],
                 metadata={"description": f["description"]})
        for f in spec["fields"]
    ]
    return pa.schema(fields, metadata={"segpipe.schema": spec["name"],
                                       "segpipe.version": str(spec["version"])})
