"""The recipe reference in README.md is generated from the JSON Schema (finsft/docs.py) and kept up to date."""

from __future__ import annotations

from pathlib import Path

import pytest

from finsft import docs
from finsft.recipe import schema

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"


def _section(text: str) -> str:
    return text.split(docs.START, 1)[1].split(docs.END, 1)[0]


def test_readme_recipe_reference_is_up_to_date() -> None:
    text = README.read_text(encoding="utf-8")
    assert text.count(docs.START) == 1 and text.count(docs.END) == 1
    assert _section(text) == "\n" + docs.render(), (
        f"README.md's recipe reference differs from the schema: run `{docs.COMMAND}` and commit the result")


def test_readme_keeps_its_title_and_heading() -> None:
    text = README.read_text(encoding="utf-8")
    assert text.startswith("# finsft\n")
    assert text.index("## Recipe reference") < text.index(docs.START)


def test_render_documents_every_key_of_every_section() -> None:
    rendered = docs.render()
    properties = schema()["properties"]
    for section, sub in properties.items():
        assert f"| `{section}` |" in rendered or f"[`{section}`](#" in rendered
        if "properties" in sub:
            assert f"\n### `{section}`\n" in rendered
            table = rendered.split(f"\n### `{section}`\n", 1)[1].split("\n### ", 1)[0]
            for key, prop in sub["properties"].items():
                row = next(line for line in table.splitlines() if line.startswith(f"| `{key}` |"))
                assert " ".join(prop["description"].split())[:30].replace("|", "\\|") in row
                # finsft's keys: a full row with an example; the libraries' long tail: a compact row
                assert row.count(" | ") >= (3 if "x-library" in prop else 4)
    assert "**required**" in rendered
    assert "| `max_steps` | integer ≥ -1, ≠ 0 | `-1` |" in rendered
    assert "| `packing` | `\"auto\"`, `true`, `false` | `\"auto\"` |" in rendered


def test_render_keeps_the_long_tail_compact_and_says_what_finsft_sets() -> None:
    rendered = docs.render()
    training = rendered.split("\n### `training`\n", 1)[1].split("\n### ", 1)[0]
    # finsft's keys first, then the library's other fields, then the excluded ones with their reasons
    assert training.index("| `precision` |") < training.index("Every other field of `trl.SFTConfig`") \
        < training.index("| `adam_beta2` | number | `0.999` |") < training.index("that finsft sets itself")
    assert "- `bf16`, `fp16`: set by training.precision" in training
    assert "- `push_to_hub`, `hub_token`" in training
    long_rows = [line for line in training.splitlines() if line.startswith("| `") and line.count(" | ") == 3]
    assert len(long_rows) > 50 and max(len(r) for r in long_rows) < 420
    assert docs._first_sentence("word " * 100).endswith(" …") and len(docs._first_sentence("word " * 100)) <= 202
    assert docs._first_sentence("The first sentence is long enough. The second.") == \
        "The first sentence is long enough."


def test_describe_type() -> None:
    assert docs.describe_type({"type": "integer", "minimum": 1}) == "integer ≥ 1"
    assert docs.describe_type({"type": "number", "exclusiveMinimum": 0, "maximum": 1}) == "number > 0, ≤ 1"
    assert docs.describe_type({"type": ["string", "null"], "minLength": 1}) == "non-empty string or null"
    assert docs.describe_type({"enum": ["a", True]}) == '`"a"`, `true`'
    assert docs.describe_type({"type": "array", "items": {"type": "string"}, "minItems": 2, "uniqueItems": True}) \
        == "list of strings (at least 2, unique)"
    assert docs.describe_type({"type": "object", "additionalProperties": {"type": "string"}}) \
        == "object of string values"
    assert docs.describe_type({"type": "string", "pattern": "^a|b$"}) == "string matching `^a\\|b$`"
    assert docs.describe_type({}) == "any"


def test_replace_section_keeps_the_rest(tmp_path: Path) -> None:
    text = f"# t\n\nintro\n\n{docs.START}\nold\n{docs.END}\n\n## After\n"
    new = docs.replace_section(text, "NEW\n")
    assert new == f"# t\n\nintro\n\n{docs.START}\nNEW\n{docs.END}\n\n## After\n"
    assert docs.replace_section(new, "NEW\n") == new
    for broken in ("no markers", f"{docs.END}\n{docs.START}", f"{docs.START}{docs.START}{docs.END}"):
        with pytest.raises(ValueError, match="expected one"):
            docs.replace_section(broken, "x")


def test_main_rewrites_checks_and_prints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "README.md"
    path.write_text(f"# x\n{docs.START}\nstale\n{docs.END}\ntail\n", encoding="utf-8")
    assert docs.main([str(path), "--check"]) == 1
    assert f"run `{docs.COMMAND}`" in capsys.readouterr().err
    assert "stale" in path.read_text()
    assert docs.main([str(path)]) == 0
    assert path.read_text() == f"# x\n{docs.START}\n{docs.render()}{docs.END}\ntail\n"
    assert docs.main([str(path), "--check"]) == 0
    assert "up to date" in capsys.readouterr().out
    path.write_text("no markers")
    assert docs.main([str(path)]) == 2
    assert docs.main([]) == 0
    assert capsys.readouterr().out == docs.render()
