"""The spec machinery: types as schema, clear errors, overrides."""

from __future__ import annotations

from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from lesion_ray import spec
from lesion_ray.spec import CheckContext, InputUri, OutputUri, Pair, SpecError

Workers = Annotated[int, Field(ge=1)]


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    size: int = Field(64, ge=8, le=1024)
    mode: Literal["a", "b"] = "a"


class Example(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    data: InputUri
    out: OutputUri
    workers: Workers | Pair[Workers] = 1
    rate: float = 0.1
    flag: bool = False
    tags: list[str] = []
    inner: Inner = Field(default_factory=Inner)
    maybe: str | None = None


def parse(data: dict) -> Example:
    return spec.from_dict(Example, data, "x.yaml")


def test_good_values_are_converted() -> None:
    ex = parse({"data": "in", "out": "o", "workers": [1, 3], "rate": 1, "flag": True, "tags": ["p"],
                "inner": {"size": 128, "mode": "b"}})
    assert ex.workers == (1, 3) and isinstance(ex.workers, tuple)
    assert ex.rate == 1.0 and isinstance(ex.rate, float)
    assert ex.inner == Inner(size=128, mode="b")
    assert isinstance(ex.data, InputUri)
    assert ex.model_dump(mode="json")["workers"] == [1, 3]


@pytest.mark.parametrize(
    ("data", "path", "text"),
    [
        ({"data": "d", "out": "o", "epochs": 3}, "epochs", "unknown key"),
        ({"data": "d", "out": "o", "inner": {"sise": 3}}, "inner.sise", "did you mean 'size'"),
        ({"out": "o"}, "data", "missing required key"),
        ({"data": "d", "out": "o", "workers": "two"}, "workers", "an integer or a list of 2 values"),
        ({"data": "d", "out": "o", "workers": 0}, "workers", "at least 1"),
        ({"data": "d", "out": "o", "workers": [1, 0]}, "workers", "at least 1"),
        ({"data": "d", "out": "o", "rate": "fast"}, "rate", "expected a number"),
        ({"data": "d", "out": "o", "flag": "yes please"}, "flag", "true or false"),
        ({"data": "d", "out": "o", "tags": "p"}, "tags", "a list of strings"),
        ({"data": "d", "out": "o", "tags": ["p", 3]}, "tags[1]", "a string"),
        ({"data": "d", "out": "o", "inner": {"size": 4096}}, "inner.size", "at most 1024"),
        ({"data": "d", "out": "o", "inner": {"mode": "c"}}, "inner.mode", "one of 'a', 'b'"),
        ({"data": "", "out": "o"}, "data", "a path or URI"),
        ({"data": 5, "out": "o"}, "data", "a path or URI"),
    ],
)
def test_bad_values_name_the_key(data: dict, path: str, text: str) -> None:
    with pytest.raises(SpecError) as info:
        parse(data)
    assert info.value.path == path
    assert text in info.value.message
    assert str(info.value).startswith(f"x.yaml: {path}: ")


def test_uri_checks(tmp_path, s3_bucket: str) -> None:
    (tmp_path / "in").mkdir()
    ex = parse({"data": str(tmp_path / "in"), "out": str(tmp_path / "new" / "deeper")})
    spec.check_uris(ex, CheckContext("x.yaml"))
    bad = parse({"data": str(tmp_path / "missing"), "out": "o"})
    with pytest.raises(SpecError, match="x.yaml: data: nothing found"):
        spec.check_uris(bad, CheckContext("x.yaml"))
    spec.check_uris(bad, CheckContext("x.yaml", produced=[str(tmp_path / "missing")]))  # an earlier step makes it
    bad_bucket = parse({"data": str(tmp_path / "in"), "out": "s3://no-such-bucket-here/out"})
    with pytest.raises(SpecError, match="out: bucket 'no-such-bucket-here' does not exist"):
        spec.check_uris(bad_bucket, CheckContext("x.yaml"))
    spec.check_uris(parse({"data": str(tmp_path / "in"), "out": f"{s3_bucket}/out"}), CheckContext("x.yaml"))


def test_overrides() -> None:
    data = {"name": "p", "steps": [{"name": "a", "x": 1}, {"name": "b", "inner": {"y": 2}}]}
    spec.apply_overrides(data, ["steps.b.inner.y=5", "steps.0.x=[1, 2]", "new.key=true", "s=text"], "p.yaml")
    assert data["steps"][1]["inner"]["y"] == 5
    assert data["steps"][0]["x"] == [1, 2]
    assert data["new"] == {"key": True} and data["s"] == "text"
    with pytest.raises(SpecError, match="no list item named 'zzz'"):
        spec.apply_overrides(data, ["steps.zzz.x=1"], "p.yaml")
    with pytest.raises(SpecError, match="dotted.key=value"):
        spec.apply_overrides(data, ["novalue"], "p.yaml")
    with pytest.raises(SpecError, match="s: cannot override inside a value that is not a mapping"):
        spec.apply_overrides(data, ["s.x=1"], "p.yaml")  # s is "text"


def test_yaml_errors(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: train\nname: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML") as info:
        spec.read_yaml(str(bad))
    assert "line" in info.value.path
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="expected a mapping"):
        spec.read_yaml(str(listy))
    with pytest.raises(SpecError, match="kind: expected one of synth, train"):
        spec.parse({"kind": "trian", "name": "x"}, "k.yaml")
    with pytest.raises(SpecError, match=r"kind: expected one of synth, .*, got \['serve'\]"):
        spec.parse({"kind": ["serve"], "name": "x"}, "k.yaml")
    with pytest.raises(SpecError, match="name: missing required key"):
        spec.parse({"kind": "train"}, "k.yaml")
